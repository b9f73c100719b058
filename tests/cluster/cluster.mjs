// A real cluster for the multi-instance tests: PostgreSQL, Redis, three tally instances
// and nginx in front, all from Debian's packages, started by scripts/cluster.sh in a
// temporary directory on loopback ports, and stopped when the test file ends.
//
//   const c = await startCluster();
//   c.lb            {url, port}: nginx
//   c.nodes[i]      {url, port, name}: the instances, straight
//   await c.sql('SELECT count(*) FROM ballots')     -> rows (arrays of strings) via psql
//   await c.kill('tally-2', 'KILL'); await c.start('tally-2')
//   await c.stopService('redis'); await c.startService('redis')   (same port)
//   await c.ensureRunning('tally-2')   (starts it unless it runs)
//   c.voteTarget(pollId)   the instance nginx sends the poll's ballots to
//   await c.stop()
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, '../..');
const SCRIPT = path.join(ROOT, 'scripts/cluster.sh');

// args: extra `tally serve` arguments for every instance (e.g. ['--reconcile-interval', '1']).
export async function startCluster({ instances = 3, env: extra = {}, args = [] } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-cluster-'));
  const env = { ...process.env, CLUSTER_INSTANCES: String(instances), TALLY_RATE_LIMITS: 'off', ...extra };
  delete env.CLUSTER_PORT;
  const { stdout } = await run(SCRIPT, ['start', dir, ...(args.length ? ['--', ...args] : [])],
    { env, maxBuffer: 1 << 20, timeout: 120_000 });
  const info = JSON.parse(stdout.trim().split('\n').pop());
  const c = {
    dir,
    info,
    secret: info.secret,
    lb: { url: info.url, port: Number(new URL(info.url).port), logs: () => logs(dir) },
    nodes: info.instances.map((n) => ({ name: n.name, url: n.url, port: n.port, logs: () => logs(dir) })),
    async sql(query) {
      const { stdout: out } = await run('psql', [info.store, '-At', '-F', '\t', '-c', query], { timeout: 30_000 });
      return out.split('\n').filter((l) => l.length).map((l) => l.split('\t'));
    },
    async cmd(...args) {
      const { stdout: out } = await run(SCRIPT, [...args.slice(0, 1), dir, ...args.slice(1)],
        { env, timeout: 60_000 });
      return out;
    },
    kill(name, signal = 'KILL') { return c.cmd('kill', name, signal); },
    start(name) { return c.cmd('start-one', name); },
    stopService(name) { return c.cmd('kill', name, 'TERM'); },
    startService(name) { return c.cmd('start-one', name); },
    // starts NAME again unless it runs: for a test's `finally`, so that a failure between a
    // kill and its start does not leave the next tests a member short
    async ensureRunning(name) {
      try {
        await c.cmd('start-one', name);
      } catch (e) {
        if (!/already runs/.test(String(e.stderr ?? e.message))) throw e;
      }
    },
    // the instance nginx sends the poll's ballots to (scripts/cluster.sh: a hash of the
    // poll id), from its access log: undefined before a ballot of it went through nginx
    voteTarget(pollId) {
      const log = fs.readFileSync(path.join(dir, 'nginx-access.log'), 'utf8');
      const re = new RegExp(`"POST /v1/polls/${pollId}/votes [^"]*" 200 .* upstream=127\\.0\\.0\\.1:(\\d+)`, 'g');
      const ports = [...log.matchAll(re)].map((m) => Number(m[1]));
      return c.nodes.find((n) => n.port === ports.at(-1));
    },
    async stop() { await run(SCRIPT, ['stop', dir], { env, timeout: 60_000 }).catch(() => {}); },
  };
  return c;
}

function logs(dir) {
  let s = '';
  for (const f of fs.readdirSync(dir).filter((x) => x.endsWith('.log'))) {
    const t = fs.readFileSync(path.join(dir, f), 'utf8');
    s += `--- ${f}\n${t.slice(-3000)}\n`;
  }
  return s;
}
