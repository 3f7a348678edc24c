// The dev enclave's OpenID provider: npm oidc-provider on loopback, users from beamhub.yaml.
//
// usage: node hub/up/idp.mjs CONFIG.json
// CONFIG: {host, port, client_id, client_secret, redirect_uris: [...], users: [{username, password,
//          email, amr: [...], acr, projects: {project: role}}]}
// Prints one JSON line {"issuer": URL} on stdout once listening. Stops on SIGTERM/SIGINT.
// Login checks the user's password (constant-time); the login result carries the user's `amr`/`acr`
// so the hub can enforce MFA, and userinfo releases them with the projects/groups claims.
import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes, timingSafeEqual, createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const users = new Map(config.users.map((u) => [u.username, u]));
const MAX_BODY = 16 * 1024;

function claimsFor(user) {
  const projects = user.projects || {};
  return {
    sub: user.username,
    preferred_username: user.username,
    name: user.username,
    email: user.email || `${user.username}@example.org`,
    email_verified: true,
    projects,
    // JupyterHub group names: one per project, one per project role
    groups: Object.entries(projects).flatMap(([p, r]) => [p, `${p}:${r}`]),
    amr: user.amr || ['pwd'],
    acr: user.acr || ((user.amr || []).length > 1 ? 'mfa' : 'pwd'),
  };
}

function sameSecret(a, b) {
  const ha = createHash('sha256').update(String(a)).digest();
  const hb = createHash('sha256').update(String(b)).digest();
  return timingSafeEqual(ha, hb);
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(title, body) {
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${esc(title)}</title></head>
<body><h1>${esc(title)}</h1>${body}<p><small>beamhub dev identity provider (dev enclave only)</small></p></body></html>`;
}

function loginForm(uid, error, login) {
  return page('Sign-in', `${error ? `<p class="error" role="alert">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
<input type="hidden" name="prompt" value="login">
<label>User <input name="login" value="${esc(login || '')}" autofocus required></label>
<label>Password <input name="password" type="password" required></label>
<button type="submit">Sign in</button></form>`);
}

function consentForm(uid, clientId, scopes) {
  return page('Authorize', `<p>${esc(clientId)} asks for: ${esc(scopes.join(' '))}</p>
<form method="post" action="/interaction/${esc(uid)}/confirm">
<input type="hidden" name="prompt" value="consent">
<button type="submit">Continue</button></form>
<form method="get" action="/interaction/${esc(uid)}/abort"><button type="submit">Cancel</button></form>`);
}

function send(res, status, html) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(html);
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) throw Object.assign(new Error('form too large'), { status: 413 });
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

const server = createServer();
server.listen(config.port || 0, config.host || '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://${config.host || '127.0.0.1'}:${port}`;
  const signing = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });

  const provider = new Provider(issuer, {
    clients: [{
      client_id: config.client_id,
      client_secret: config.client_secret,
      redirect_uris: config.redirect_uris,
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    jwks: { keys: [{ ...signing, kid: 'beamhub-dev-idp', use: 'sig', alg: 'RS256' }] },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    claims: {
      openid: ['sub'],
      profile: ['preferred_username', 'name'],
      email: ['email', 'email_verified'],
      projects: ['projects', 'groups', 'amr', 'acr'],
    },
    scopes: ['openid', 'offline_access', 'profile', 'email', 'projects'],
    features: { devInteractions: { enabled: false } },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    pkce: { required: () => false },
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    ttl: { AccessToken: 600, IdToken: 600, Interaction: 600, Session: 3600, Grant: 86400, RefreshToken: 86400 },
    async findAccount(ctx, id) {
      const user = users.get(id);
      if (!user) return undefined;
      return { accountId: id, async claims() { return claimsFor(user); } };
    },
  });
  provider.on('server_error', (ctx, err) => console.error(`idp: server error: ${err.message}`));
  const oidc = provider.callback();

  server.on('request', async (req, res) => {
    const url = new URL(req.url, issuer);
    const m = url.pathname.match(/^\/interaction\/([\w-]+)(?:\/(login|confirm|abort))?$/);
    if (!m) return oidc(req, res);
    try {
      const details = await provider.interactionDetails(req, res);
      const [, uid, action] = m;
      if (!action && req.method === 'GET') {
        if (details.prompt.name === 'login') return send(res, 200, loginForm(uid));
        const scopes = (details.params.scope || '').split(' ');
        return send(res, 200, consentForm(uid, details.params.client_id, scopes));
      }
      if (action === 'abort') {
        return provider.interactionFinished(req, res, {
          error: 'access_denied', error_description: 'the user cancelled the sign-in',
        }, { mergeWithLastSubmission: false });
      }
      if (req.method !== 'POST') return send(res, 405, page('Error', '<p>use the form</p>'));
      const form = await readForm(req);
      if (action === 'login') {
        if (details.prompt.name !== 'login') return send(res, 400, page('Error', '<p>not a login step</p>'));
        const login = form.get('login') || '';
        const user = users.get(login);
        // one message for unknown user and wrong password: do not tell which half was wrong
        if (!user || !user.password || !sameSecret(form.get('password') || '', user.password)) {
          console.error(`idp: refused sign-in for ${JSON.stringify(login.slice(0, 64))}`);
          return send(res, 401, loginForm(uid, 'Unknown user or wrong password.', login));
        }
        const claims = claimsFor(user);
        return provider.interactionFinished(req, res, {
          login: { accountId: user.username, amr: claims.amr, acr: claims.acr },
        }, { mergeWithLastSubmission: false });
      }
      if (details.prompt.name !== 'consent') return send(res, 400, page('Error', '<p>not a consent step</p>'));
      const { grantId, session, params, prompt: { details: need } } = details;
      const grant = grantId ? await provider.Grant.find(grantId)
        : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
      if (need.missingOIDCScope) grant.addOIDCScope(need.missingOIDCScope.join(' '));
      if (need.missingOIDCClaims) grant.addOIDCClaims(need.missingOIDCClaims);
      if (need.missingResourceScopes) {
        for (const [indicator, scope] of Object.entries(need.missingResourceScopes)) {
          grant.addResourceScope(indicator, scope.join(' '));
        }
      }
      return provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } },
        { mergeWithLastSubmission: true });
    } catch (err) {
      const status = err.status || err.statusCode || 500;
      console.error(`idp: interaction failed: ${err.message}`);
      if (!res.headersSent) send(res, status, page('Error', `<p>${esc(err.message)}</p>`));
      else res.end();
    }
  });
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => { server.close(); server.closeAllConnections(); process.exit(0); });
}
