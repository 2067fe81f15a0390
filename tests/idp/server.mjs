// Mock OpenID Connect identity provider for the Python test-suite.
//
// Driven by tests/support/idp.py (class MockIdp). Built on oauth2-mock-server 8.x
// (OAuth2Issuer + OAuth2Service exported by the package), with our own
// node:http server so that we can stop listening and listen again on the
// SAME port with the SAME keys (IdP outage simulation).
//
// Usage:  node tests/idp/server.mjs
//
// On start-up it listens on 127.0.0.1:<ephemeral port>, generates one RS256
// signing key and prints exactly one JSON line to stdout:
//
//   {"issuer": "http://127.0.0.1:PORT", "port": PORT, "jwks_uri": "...", "kid": "..."}
//
// Then it reads control commands from stdin, one JSON object per line, and
// answers each with exactly one JSON line on stdout, in order. Every answer is
// either a success object (below) or {"error": "message"}.
//
//   {"cmd":"token","claims":{...},"ttl":300,"kid":"...","header":{...}}
//       -> {"token": "<JWT>", "kid": "<kid used>"}
//       JWT signed RS256 with the current key (or with "kid" if given; it must
//       be in the key store). Payload starts as {iss, iat, exp=iat+ttl,
//       nbf=iat-10} and "claims" are merged over it (so a test may override
//       iss/exp/nbf/iat). A claim whose value is null is REMOVED from the
//       payload (e.g. {"exp": null} for a token without exp). "ttl" defaults
//       to 300 seconds and may be negative (already-expired token). "header"
//       entries are merged into the protected header (e.g. a bogus "kid");
//       "alg" cannot be overridden (the library always sets it from the key).
//   {"cmd":"rotate"}                 -> {"kid": "<new kid>", "previous_kid": "<old kid>"}
//       New RS256 key becomes the signing key; the old key is REMOVED from
//       the JWKS (tokens signed with it now carry an unknown kid).
//   {"cmd":"rotate","keep_old":true} -> same, but the old key stays published
//       in the JWKS (overlapping rotation); tokens are signed with the new key.
//   {"cmd":"jwks"}                   -> {"keys": [...]}   public JWKS (works while stopped)
//   {"cmd":"stop"}                   -> {"listening": false}
//       Stops listening and destroys all open (keep-alive) connections; the
//       process, issuer URL and keys are kept, "token" still works.
//   {"cmd":"start"}                  -> {"listening": true, "port": PORT}
//       Listens again on the SAME 127.0.0.1 port with the SAME keys.
//   {"cmd":"status"}                 -> {"listening": bool, "port": PORT, "kid": "..."}
//   {"cmd":"exit"}                   -> {"exiting": true}, then the process exits.
//
// The process also exits when stdin is closed (EOF), so it never outlives its
// Python parent. Diagnostics go to stderr only; stdout carries protocol lines.

import { createServer } from 'node:http';
import { createInterface } from 'node:readline';
import { JWKStore, OAuth2Issuer, OAuth2Service } from 'oauth2-mock-server';

const HOST = '127.0.0.1';
const ALG = 'RS256';
const DEFAULT_TTL = 300;

// OAuth2Issuer's key store has no "remove key" operation, so rotation swaps
// in a fresh JWKStore. Both buildToken() and the /jwks handler go through the
// `keys` getter, which we override here.
class RotatingIssuer extends OAuth2Issuer {
  #store = new JWKStore();
  #currentKid = undefined;

  get keys() {
    return this.#store;
  }

  get currentKid() {
    return this.#currentKid;
  }

  async rotate({ keepOld = false } = {}) {
    const previous = this.#currentKid;
    const store = keepOld ? this.#store : new JWKStore();
    const jwk = await store.generate(ALG);
    this.#store = store;
    this.#currentKid = jwk.kid;
    return { kid: jwk.kid, previous_kid: previous ?? null };
  }
}

// Issuer URL without trailing slash, e.g. http://127.0.0.1:PORT (the
// library's own OAuth2Server would advertise "http://localhost:PORT").
const issuer = new RotatingIssuer(false);
const service = new OAuth2Service(issuer);
const server = createServer(service.requestHandler);

// A client-credentials token names its client in `sub`, as real IdPs do (Keycloak: the service
// account, Auth0: "<client_id>@clients"); the library leaves `sub` out, which a gateway refuses.
service.on('beforeTokenSigning', (token, req) => {
  if (req?.body?.grant_type !== 'client_credentials' || token.payload.sub !== undefined) return;
  const basic = /^Basic\s+(.+)$/i.exec(req.headers?.authorization ?? '');
  const fromBasic = basic ? decodeURIComponent(Buffer.from(basic[1], 'base64').toString().split(':')[0]) : undefined;
  const clientId = fromBasic ?? req.body.client_id;
  if (typeof clientId === 'string' && clientId) token.payload.sub = clientId;
});
let port = 0;

function listen(p) {
  return new Promise((resolve, reject) => {
    const onError = (err) => {
      server.off('listening', onListening);
      reject(err);
    };
    const onListening = () => {
      server.off('error', onError);
      resolve(server.address().port);
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen(p, HOST);
  });
}

function close() {
  return new Promise((resolve, reject) => {
    server.close((err) => (err ? reject(err) : resolve()));
    // Drop keep-alive and in-flight connections too: a real outage does not
    // politely finish pending requests, and close() would otherwise wait.
    server.closeAllConnections();
  });
}

function write(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

async function handle(msg) {
  if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
    throw new Error('command must be a JSON object');
  }
  switch (msg.cmd) {
    case 'token': {
      const claims = msg.claims ?? {};
      const header = msg.header ?? {};
      if (typeof claims !== 'object' || Array.isArray(claims)) throw new Error('"claims" must be an object');
      if (typeof header !== 'object' || Array.isArray(header)) throw new Error('"header" must be an object');
      const ttl = msg.ttl ?? DEFAULT_TTL;
      if (typeof ttl !== 'number' || !Number.isFinite(ttl)) throw new Error('"ttl" must be a number');
      const kid = msg.kid ?? issuer.currentKid;
      if (issuer.keys.toJSON().every((k) => k.kid !== kid)) throw new Error(`unknown signing kid ${JSON.stringify(kid)}`);
      const token = await issuer.buildToken({
        kid,
        expiresIn: ttl,
        scopesOrTransform: (hdr, payload) => {
          for (const [name, value] of Object.entries(claims)) {
            if (value === null) delete payload[name];
            else payload[name] = value;
          }
          Object.assign(hdr, header);
        },
      });
      return { token, kid };
    }
    case 'rotate':
      return await issuer.rotate({ keepOld: msg.keep_old === true });
    case 'jwks':
      return { keys: issuer.keys.toJSON() };
    case 'stop':
      if (server.listening) await close();
      return { listening: false };
    case 'start':
      if (!server.listening) await listen(port);
      return { listening: true, port };
    case 'status':
      return { listening: server.listening, port, kid: issuer.currentKid };
    case 'exit':
      setImmediate(() => process.exit(0));
      return { exiting: true };
    default:
      throw new Error(`unknown cmd ${JSON.stringify(msg.cmd)}`);
  }
}

async function main() {
  await issuer.rotate();
  port = await listen(0);
  issuer.url = `http://${HOST}:${port}`;
  write({ issuer: issuer.url, port, jwks_uri: `${issuer.url}/jwks`, kid: issuer.currentKid });

  // Commands are processed strictly one after another so answers stay in order.
  let queue = Promise.resolve();
  const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
  rl.on('line', (line) => {
    if (!line.trim()) return;
    queue = queue.then(async () => {
      let answer;
      try {
        answer = await handle(JSON.parse(line));
      } catch (err) {
        answer = { error: err instanceof Error ? err.message : String(err) };
      }
      write(answer);
    });
  });
  rl.on('close', () => {
    queue.finally(() => process.exit(0));
  });
}

main().catch((err) => {
  process.stderr.write(`mock idp failed to start: ${err?.stack ?? err}\n`);
  process.exit(1);
});
