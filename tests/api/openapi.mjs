// docs/openapi.yaml as a checker of real responses (issue 21): every response the API
// harness receives (api() and request() in harness.mjs) must be one the document
// describes, so the document cannot drift from the server again.
//
// For a request (method, path) and its response (status, Content-Type, body):
//  - the path is matched against the document's path templates ({name} = one segment);
//    paths outside /v1 that no template matches are the web UI's (GET /), paths under
//    /v1 that none matches may only be answered 404 or 405 with the error envelope;
//  - the operation (HEAD is GET's) must list the status (or "default"); a method the
//    path does not have may only be answered 405 with the error envelope (or, OPTIONS,
//    204: the CORS preflight);
//  - a JSON body must validate against the schema the document gives for that status
//    and media type (Ajv, JSON Schema 2020-12, which OpenAPI 3.1 schemas are), and a
//    response the document gives a JSON schema for must be JSON.
// A violation throws, naming the request, the response and what the document says.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';
import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';

const here = path.dirname(fileURLToPath(import.meta.url));
export const OPENAPI_FILE = path.resolve(here, '../../docs/openapi.yaml');

let cached = null;
const isJson = (ct) => /^application\/(?:[\w.+-]*\+)?json\b/.test(ct || '');

/** The document, its compiled path templates and an Ajv holding its schemas. */
export function loadOpenApi() {
  if (cached) return cached;
  const doc = YAML.parse(fs.readFileSync(OPENAPI_FILE, 'utf8'));
  // strict: false: OpenAPI adds keywords of its own (example, discriminator, xml, ...)
  const ajv = new Ajv2020({ strict: false, allErrors: true, validateFormats: true });
  addFormats(ajv);
  ajv.addSchema({ $id: 'openapi', components: doc.components }, 'openapi');
  const paths = Object.entries(doc.paths).map(([template, item]) => {
    const re = new RegExp('^' + template.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\\?\{[^}]+\\?\}/g, '[^/]+') + '$');
    const literals = template.split('/').filter((s) => s && !s.startsWith('{')).length;
    return { template, item, re, literals };
  });
  // a literal segment beats a capture: /v1/polls/{poll_id}/results.svg before .../{x}
  paths.sort((a, b) => b.literals - a.literals);
  cached = { doc, ajv, paths, validators: new Map() };
  // every JSON schema of a response compiled now, at import, not inside a test's timing
  for (const { item } of paths) {
    for (const op of Object.values(item)) {
      for (const r of Object.values(op?.responses || {})) {
        for (const [media, c] of Object.entries(deref(doc, r)?.content || {})) {
          if (isJson(media) && c.schema) validatorFor(cached, c.schema);
        }
      }
    }
  }
  validatorFor(cached, { $ref: '#/components/schemas/Error' });
  return cached;
}

/** Follows a local $ref ("#/components/responses/X") to what it names. */
function deref(doc, o) {
  let n = 0;
  while (o && o.$ref && n++ < 10) {
    const parts = o.$ref.replace(/^#\//, '').split('/');
    o = parts.reduce((x, k) => x?.[k.replace(/~1/g, '/').replace(/~0/g, '~')], doc);
  }
  return o;
}

function validatorFor(api, schema) {
  const key = JSON.stringify(schema);
  let v = api.validators.get(key);
  if (!v) {
    // the schema may $ref "#/components/schemas/X": resolve against the document's
    // components, added to Ajv as the schema "openapi"
    const rewritten = JSON.parse(JSON.stringify(schema).replace(/"#\/components\//g, '"openapi#/components/'));
    v = api.ajv.compile(rewritten);
    api.validators.set(key, v);
  }
  return v;
}

function findPath(api, urlPath) {
  return api.paths.find((p) => p.re.test(urlPath)) || null;
}


/**
 * Checks one response against the document; returns null when it is described, or a
 * message saying what does not fit.
 * res: {status, headers: Headers or a plain object, text, json}
 */
export function checkResponse(method, url, res) {
  const api = loadOpenApi();
  const urlPath = url.split('?')[0].split('#')[0];
  const m = method.toUpperCase();
  const header = (name) => (typeof res.headers?.get === 'function' ? res.headers.get(name) : res.headers?.[name]);
  const ct = header('content-type') || '';
  const checkEnvelope = (why) => {
    if (!isJson(ct)) return `${why}: expected the JSON error envelope, got Content-Type ${ct || '(none)'}`;
    const v = validatorFor(api, { $ref: '#/components/schemas/Error' });
    return v(res.json) ? null : `${why}: not the error envelope: ${api.ajv.errorsText(v.errors)}`;
  };

  let found = findPath(api, urlPath);
  if (!found) {
    if (urlPath === '/v1' || urlPath.startsWith('/v1/')) {
      if (res.status === 404 || res.status === 405) return checkEnvelope(`${m} ${urlPath} (no such path)`);
      return `${m} ${urlPath}: no path of the document matches, and the answer is ${res.status}, not 404 or 405`;
    }
    found = api.paths.find((p) => p.template === '/'); // the web UI
    if (!found) return `${m} ${urlPath}: no path of the document matches`;
  }
  const op = found.item[m === 'HEAD' ? 'get' : m.toLowerCase()];
  if (!op) {
    if (res.status === 405) return checkEnvelope(`${m} ${found.template}`);
    if (m === 'OPTIONS' && res.status === 204) return null; // CORS preflight ("Caching and CORS")
    if (m === 'OPTIONS' && res.status === 404) return checkEnvelope(`${m} ${found.template}`);
    if (found.template === '/' && res.status === 404) return checkEnvelope(`${m} ${urlPath} (web UI)`);
    return `${m} ${found.template}: the document has no ${m.toLowerCase()} operation, and the answer is ${res.status}`;
  }
  const responses = op.responses || {};
  const key = String(res.status);
  const described = responses[key] ?? responses[`${key[0]}XX`] ?? responses.default;
  if (!described) {
    return `${m} ${found.template} → ${res.status}: the document lists only ${Object.keys(responses).join(', ')}`;
  }
  const r = deref(api.doc, described);
  if (m === 'HEAD' || res.status === 204 || res.status === 304) return null; // no body
  const content = r?.content || {};
  const media = Object.keys(content);
  if (media.length === 0) return null;
  const jsonMedia = media.find((k) => isJson(k));
  if (isJson(ct)) {
    if (!jsonMedia) return `${m} ${found.template} → ${res.status}: JSON, but the document says ${media.join(', ')}`;
    const schema = content[jsonMedia].schema;
    if (!schema) return null;
    if (res.json === null && res.text !== 'null') return `${m} ${found.template} → ${res.status}: the body is not JSON: ${String(res.text).slice(0, 200)}`;
    const v = validatorFor(api, schema);
    if (!v(res.json)) {
      return `${m} ${found.template} → ${res.status}: the body does not fit the document's schema: ` +
        `${api.ajv.errorsText(v.errors, { separator: '; ' })}\nbody: ${String(res.text).slice(0, 600)}`;
    }
    return null;
  }
  const base = ct.split(';')[0].trim();
  if (base && !media.some((k) => k === base || k === '*/*' || (k.endsWith('/*') && base.startsWith(k.slice(0, -1))))) {
    return `${m} ${found.template} → ${res.status}: Content-Type ${base}, but the document says ${media.join(', ')}`;
  }
  return null;
}

/** Throws when checkResponse finds the response undocumented. */
export function assertDocumented(method, url, res, context = '') {
  const problem = checkResponse(method, url, res);
  if (problem) {
    const err = new Error(`docs/openapi.yaml does not describe this response: ${problem}${context ? `\n${context}` : ''}`);
    err.code = 'OPENAPI_MISMATCH';
    throw err;
  }
}
