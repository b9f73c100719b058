// Packaging (issue 21): `make install` and `make deb` put the binary, its man page, the
// web app and the systemd unit in place; the installed tree works outside the checkout
// (the web app is in the binary); the unit's own command starts the server the way
// systemd would (its Environment, an EnvironmentFile, STATE_DIRECTORY, NOTIFY_SOCKET:
// READY=1, RELOADING=1 on SIGHUP, STOPPING=1 on SIGTERM); `man` renders the page and it
// describes every option `tally --help` lists.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, sleep, tail } from '../api/harness.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const tmpDirs = [];
after(() => { for (const d of tmpDirs) fs.rmSync(d, { recursive: true, force: true }); });
const tmp = (p) => { const d = fs.mkdtempSync(path.join(os.tmpdir(), p)); tmpDirs.push(d); return d; };

function make(args, timeout = 120_000) {
  const r = spawnSync('make', ['--no-print-directory', '-C', ROOT, ...args], { encoding: 'utf8', timeout });
  assert.equal(r.status, 0, `make ${args.join(' ')}:\n${tail(r.stdout + r.stderr, 6000)}`);
  return r.stdout;
}

/** The [Service]/[Unit] settings of a unit file: name -> [values] */
function unit(file) {
  const out = {};
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line.trim());
    if (m) (out[m[1]] ||= []).push(m[2]);
  }
  return out;
}

/** Every --option of `tally --help` is in the man page, which man renders. */
function checkMan(manFile, bin) {
  const r = spawnSync('man', ['-l', manFile], { encoding: 'utf8', env: { ...process.env, MANWIDTH: '100', MAN_KEEP_FORMATTING: '' } });
  assert.equal(r.status, 0, `man -l ${manFile}: ${r.stderr}`);
  const text = r.stdout.replace(/.\x08/g, ''); // no overstrike
  for (const section of ['NAME', 'SYNOPSIS', 'DESCRIPTION', 'OPTIONS', 'SIGNALS', 'FILES', 'EXIT STATUS']) {
    assert.match(text, new RegExp(`^${section}$`, 'm'), `the man page has ${section}`);
  }
  const help = execFileSync(bin, ['--help'], { encoding: 'utf8' });
  const options = [...new Set([...help.matchAll(/^ {2}(--[a-z-]+)/gm)].map((m) => m[1]))];
  assert.ok(options.length > 40, `options in --help: ${options.length}`);
  for (const o of options) assert.ok(text.includes(o), `the man page describes ${o}`);
}

/**
 * Runs the unit's ExecStart as systemd would, from the installed tree at root: the
 * binary under root, Environment= and the EnvironmentFile (written here, as an operator
 * would, with a free port), STATE_DIRECTORY, NOTIFY_SOCKET read by a listener. Checks
 * READY=1, GET / (the web app in the binary; cwd is outside the checkout), SIGHUP
 * (RELOADING=1, READY=1, still serving) and SIGTERM (STOPPING=1, exit 0).
 */
async function startUnit(root, unitFile) {
  const u = unit(unitFile);
  assert.deepEqual(u.Type, ['notify']);
  assert.deepEqual(u.DynamicUser, ['yes']);
  assert.deepEqual(u.ProtectSystem, ['strict']);
  assert.deepEqual(u.StateDirectory, ['tally']);
  assert.deepEqual(u.ExecReload, ['/bin/kill -HUP $MAINPID']);
  const state = tmp('tally-state-');
  const port = await freePort();
  const envFile = u.EnvironmentFile[0].replace(/^-/, '');
  const envPath = path.join(root, envFile);
  assert.ok(fs.existsSync(envPath), `the package ships ${envFile}`);
  fs.writeFileSync(envPath, fs.readFileSync(envPath, 'utf8') + `TALLY_LISTEN=127.0.0.1:${port}\n`);
  const env = { PATH: process.env.PATH, STATE_DIRECTORY: state };
  for (const e of u.Environment) { const [k, ...v] = e.split('='); env[k] = v.join('='); }
  for (const line of fs.readFileSync(envPath, 'utf8').split('\n')) {
    const m = /^([A-Z_]+)=(.*)$/.exec(line.trim());
    if (m) env[m[1]] = m[2];
  }
  // the notify socket: a datagram socket, read by python3 (node has none for AF_UNIX)
  const sockDir = tmp('tally-notify-');
  const sock = path.join(sockDir, 'notify');
  const listener = spawn('python3', ['-u', '-c', `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print("BOUND", flush=True)
while True:
    print(s.recv(4096).decode().replace("\\n", " "), flush=True)
`, sock], { stdio: ['ignore', 'pipe', 'inherit'] });
  let notes = '';
  listener.stdout.on('data', (d) => { notes += d; });
  const waitNote = async (re, what) => {
    const deadline = Date.now() + 15_000;
    while (!re.test(notes)) {
      if (Date.now() > deadline) assert.fail(`${what}: not within 15 s; notifications: ${notes}`);
      await sleep(20);
    }
  };
  await waitNote(/BOUND/, 'the notify listener');
  env.NOTIFY_SOCKET = sock;
  const [cmd, ...args] = u.ExecStart[0].replace('${STATE_DIRECTORY}', state).split(/\s+/);
  const bin = path.join(root, cmd);
  const cwd = tmp('tally-cwd-'); // not the checkout: no web/ beside it
  const child = spawn(bin, args, { env, cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  child.stdout.on('data', (d) => { log += d; });
  child.stderr.on('data', (d) => { log += d; });
  try {
    await waitNote(/READY=1/, `READY=1 from ${bin} ${args.join(' ')}\n${tail(log)}`);
    const page = await fetch(`http://127.0.0.1:${port}/`);
    assert.equal(page.status, 200);
    assert.match(page.headers.get('content-type'), /^text\/html/);
    assert.match(await page.text(), /<script type="module" src="\/js\/app.js">/);
    const js = await fetch(`http://127.0.0.1:${port}/js/app.js`);
    assert.equal(js.status, 200);
    await js.text();
    assert.ok(fs.existsSync(path.join(state, 'tally.db')), 'the store is in the state directory');
    assert.ok(fs.existsSync(path.join(state, 'secret')), 'so is the secret');
    notes = notes.replace(/READY=1/g, 'ready');
    child.kill('SIGHUP');
    await waitNote(/RELOADING=1[\s\S]*READY=1/, 'a reload');
    assert.equal((await fetch(`http://127.0.0.1:${port}/healthz`)).status, 200, 'still serving after SIGHUP');
    const exited = new Promise((r) => child.once('exit', (code, signal) => r({ code, signal })));
    child.kill('SIGTERM');
    await waitNote(/STOPPING=1/, 'STOPPING=1');
    assert.deepEqual(await exited, { code: 0, signal: null }, tail(log));
  } finally {
    child.kill('SIGKILL');
    listener.kill('SIGKILL');
  }
}

test('make install: binary, man page, web app, systemd unit; the unit starts it outside the checkout', async () => {
  const dest = tmp('tally-install-');
  make(['install', `DESTDIR=${dest}`, 'PREFIX=/usr']);
  for (const f of ['usr/bin/tally', 'usr/share/man/man1/tally.1', 'usr/lib/systemd/system/tally.service',
    'etc/default/tally', 'usr/share/tally/web/index.html', 'usr/share/tally/web/js/app.js',
    'usr/share/doc/tally/openapi.yaml']) {
    assert.ok(fs.existsSync(path.join(dest, f)), `installed ${f}`);
  }
  assert.ok(fs.statSync(path.join(dest, 'usr/bin/tally')).mode & 0o111, 'the binary is executable');
  const u = unit(path.join(dest, 'usr/lib/systemd/system/tally.service'));
  assert.deepEqual(u.ExecStart, ['/usr/bin/tally serve --data-dir ${STATE_DIRECTORY}']);
  assert.deepEqual(u.EnvironmentFile, ['-/etc/default/tally']);
  checkMan(path.join(dest, 'usr/share/man/man1/tally.1'), path.join(dest, 'usr/bin/tally'));
  await startUnit(dest, path.join(dest, 'usr/lib/systemd/system/tally.service'));
  // PREFIX=/usr/local: the unit names that binary and /usr/local/etc
  const local = tmp('tally-install-local-');
  make(['install', `DESTDIR=${local}`]);
  const lu = unit(path.join(local, 'usr/local/lib/systemd/system/tally.service'));
  assert.deepEqual(lu.ExecStart, ['/usr/local/bin/tally serve --data-dir ${STATE_DIRECTORY}']);
  assert.deepEqual(lu.EnvironmentFile, ['-/usr/local/etc/default/tally']);
});

test('man ./tally.1 renders, with every option', () => {
  checkMan(path.join(ROOT, 'tally.1'), process.env.TALLY_BIN || path.join(ROOT, 'build/tally'));
});

test('make deb builds a package; installed into a fresh tree, the unit starts it', { timeout: 900_000 }, async () => {
  const out = make(['deb'], 900_000);
  const debs = fs.readdirSync(path.join(ROOT, 'build/deb')).filter((f) => /^tally_.*\.deb$/.test(f));
  assert.equal(debs.length, 1, `one package: ${debs}\n${tail(out)}`);
  const deb = path.join(ROOT, 'build/deb', debs[0]);
  const info = execFileSync('dpkg-deb', ['-f', deb, 'Package', 'Version', 'Depends'], { encoding: 'utf8' });
  assert.match(info, /^Package: tally$/m);
  assert.match(info, /^Depends: .*libsqlite3/m, 'Depends from the linked libraries');
  assert.match(info, /libsystemd0/);
  const files = execFileSync('dpkg-deb', ['-c', deb], { encoding: 'utf8' });
  for (const f of ['./usr/bin/tally', './lib/systemd/system/tally.service', './usr/share/man/man1/tally.1',
    './etc/default/tally']) {
    assert.ok(files.includes(f), `the package holds ${f}`);
  }
  // the maintainer scripts enable and start the unit (dh_installsystemd)
  const control = tmp('tally-deb-control-');
  execFileSync('dpkg-deb', ['-e', deb, control]);
  assert.match(fs.readFileSync(path.join(control, 'postinst'), 'utf8'), /deb-systemd-helper .*enable.*tally\.service|tally\.service/);
  assert.match(fs.readFileSync(path.join(control, 'conffiles'), 'utf8'), /^\/etc\/default\/tally$/m);
  // a fresh directory tree, as dpkg would unpack it
  const root = tmp('tally-deb-root-');
  execFileSync('dpkg-deb', ['-x', deb, root]);
  const man = path.join(root, 'usr/share/man/man1');
  const page = fs.readdirSync(man).find((f) => f.startsWith('tally.1'));
  checkMan(path.join(man, page), path.join(root, 'usr/bin/tally'));
  await startUnit(root, path.join(root, 'lib/systemd/system/tally.service'));
});
