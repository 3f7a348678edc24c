// The dev enclave's OpenID provider: npm oidc-provider on loopback, users from beamhub.yaml.
//
// usage: node hub/up/idp.mjs CONFIG.json
// CONFIG: {host, port, client_id, client_secret, redirect_uris: [...], require_otp: bool,
//          users: [{username, password, email, totp_secret?, projects: {project: role}}]}
// Prints one JSON line {"issuer": URL} on stdout once listening. Stops on SIGTERM/SIGINT.
// Login checks the user's password (constant-time); where the enclave requires MFA (require_otp)
// it then asks an enrolled user for a one-time code (TOTP, RFC 6238, npm otplib). The login's
// `amr` says what was checked — ["pwd", "otp"] only after a good code — and userinfo releases it
// with the projects/groups claims, so the hub can enforce MFA. Wrong, reused and expired codes are
// refused and count towards a lockout.
import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes, timingSafeEqual, createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';

import Provider from 'oidc-provider';
import { authenticator } from 'otplib';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const users = new Map(config.users.map((u) => [u.username, u]));
const MAX_BODY = 16 * 1024;
const OTP_STEP_MS = 30 * 1000;
const OTP_MAX_FAILURES = 5;
const OTP_LOCKOUT_MS = 5 * 60 * 1000;
authenticator.options = { window: 1 }; // one 30-s step either side: clock skew, slow typing

// username -> {amr, acr} of the user's most recent sign-in (what userinfo reports)
const lastAuth = new Map();
// interaction uid -> username whose password was right and who still owes a code
const pendingOtp = new Map();
// username -> {failures, lockedUntil, lastStep}
const otpState = new Map();

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
    ...(lastAuth.get(user.username) || { amr: ['pwd'], acr: 'pwd' }),
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

function otpForm(uid, error) {
  return page('One-time code', `${error ? `<p class="error" role="alert">${esc(error)}</p>` : ''}
<p>This enclave requires a second factor. Enter the 6-digit code from your authenticator app.</p>
<form method="post" action="/interaction/${esc(uid)}/otp" autocomplete="off">
<input type="hidden" name="prompt" value="otp">
<label>Code <input name="code" inputmode="numeric" pattern="[0-9]{6}" maxlength="6" autofocus required></label>
<button type="submit">Verify</button></form>`);
}

// Check a code for `username`; returns null when accepted, else the message to show.
function checkOtp(username, secret, code) {
  const now = Date.now();
  const st = otpState.get(username) || { failures: 0, lockedUntil: 0, lastStep: -1 };
  otpState.set(username, st);
  if (st.lockedUntil > now) {
    return `Too many wrong codes: this account is locked for ${Math.ceil((st.lockedUntil - now) / 1000)} s more.`;
  }
  const delta = /^[0-9]{6}$/.test(code) ? authenticator.checkDelta(code, secret) : null;
  const step = Math.floor(now / OTP_STEP_MS) + (delta ?? 0);
  let why = null;
  if (delta === null) why = 'Wrong or expired code.';
  else if (step <= st.lastStep) why = 'This code was already used; wait for the next one.';
  if (why === null) {
    st.failures = 0;
    st.lastStep = step;
    return null;
  }
  st.failures += 1;
  if (st.failures >= OTP_MAX_FAILURES) {
    st.failures = 0;
    st.lockedUntil = now + OTP_LOCKOUT_MS;
    return `${why} Too many wrong codes: this account is locked for ${OTP_LOCKOUT_MS / 1000} s.`;
  }
  return `${why} ${OTP_MAX_FAILURES - st.failures} attempt(s) left before a lockout.`;
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
      post_logout_redirect_uris: config.post_logout_redirect_uris || [],
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
    features: {
      devInteractions: { enabled: false },
      // the hub's logout ends the IdP session too; the confirmation is one button, pre-focused
      rpInitiatedLogout: {
        enabled: true,
        async logoutSource(ctx, form) {
          ctx.body = page('Sign out', `${form}<p>Sign out of the beamhub dev identity provider?</p>
<button autofocus type="submit" form="op.logoutForm" value="yes" name="logout">Sign out</button>
<script>document.forms['op.logoutForm'].requestSubmit(document.querySelector('button[name=logout]'));</script>`);
        },
      },
    },
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
    const m = url.pathname.match(/^\/interaction\/([\w-]+)(?:\/(login|otp|confirm|abort))?$/);
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
        if (config.require_otp && user.totp_secret) {
          pendingOtp.set(uid, user.username);
          return send(res, 200, otpForm(uid));
        }
        // no second factor checked: the hub refuses this login where the enclave requires MFA
        lastAuth.set(user.username, { amr: ['pwd'], acr: 'pwd' });
        return provider.interactionFinished(req, res, {
          login: { accountId: user.username, amr: ['pwd'], acr: 'pwd' },
        }, { mergeWithLastSubmission: false });
      }
      if (action === 'otp') {
        const username = pendingOtp.get(uid);
        if (details.prompt.name !== 'login' || !username) {
          return send(res, 400, page('Error', '<p>Sign in with your password first.</p>'));
        }
        const why = checkOtp(username, users.get(username).totp_secret, (form.get('code') || '').trim());
        if (why) {
          console.error(`idp: refused one-time code for ${JSON.stringify(username)}: ${why}`);
          const locked = why.includes('locked');
          if (locked) pendingOtp.delete(uid);
          return send(res, locked ? 429 : 401, locked ? page('Sign-in refused', `<p role="alert">${esc(why)}</p>`) : otpForm(uid, why));
        }
        pendingOtp.delete(uid);
        lastAuth.set(username, { amr: ['pwd', 'otp'], acr: 'mfa' });
        return provider.interactionFinished(req, res, {
          login: { accountId: username, amr: ['pwd', 'otp'], acr: 'mfa' },
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
