// simple-oauth2, unmodified, with this service as its token endpoint: exchange a code at
// /api/token, refresh twice there (its refreshPath defaults to tokenPath), once at /refresh.
// Prints what the library holds after each step, one JSON line.
// Usage: node simple_oauth2.js SERVICE_URL CLIENT_ID CODE REDIRECT_URI
'use strict';

const { AuthorizationCode } = require('simple-oauth2');

async function main() {
  const [service, clientId, code, redirectUri] = process.argv.slice(2);
  const client = (refreshPath) => new AuthorizationCode({
    client: { id: clientId, secret: '' },
    auth: { tokenHost: service, tokenPath: '/api/token', refreshPath },
  });
  const held = [];
  let accessToken = await client('/api/token').getToken({ code, redirect_uri: redirectUri });
  held.push(accessToken.token);
  for (const path of ['/api/token', '/api/token', '/refresh']) {
    // createToken is how an app restores the token it stored; refresh() copies every field it gets.
    accessToken = await client(path).createToken(accessToken.token).refresh();
    held.push(accessToken.token);
  }
  console.log(JSON.stringify(held));
}

main().catch((error) => {
  console.error(error.output ? JSON.stringify(error.output.payload) : String(error));
  process.exit(1);
});
