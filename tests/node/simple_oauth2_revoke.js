// simple-oauth2, unmodified, signs a user out through the service: exchange a code at /api/token, then
// revokeAll() at /revoke (its access token, which the service cannot end, then its refresh token), then try to
// refresh. Prints what each step gave, one JSON line.
// Usage: node simple_oauth2_revoke.js SERVICE_URL CLIENT_ID CODE REDIRECT_URI
'use strict';

const { AuthorizationCode } = require('simple-oauth2');

async function main() {
  const [service, clientId, code, redirectUri] = process.argv.slice(2);
  const client = new AuthorizationCode({
    client: { id: clientId, secret: '' },
    auth: { tokenHost: service, tokenPath: '/api/token', revokePath: '/revoke' },
  });
  const accessToken = await client.getToken({ code, redirect_uri: redirectUri });
  await accessToken.revokeAll();
  let refused = null;
  try {
    await accessToken.refresh();
  } catch (error) {
    refused = { status: error.output.statusCode, body: error.data.payload };
  }
  console.log(JSON.stringify({ token: accessToken.token, refused }));
}

main().catch((error) => {
  console.error(error.output ? JSON.stringify(error.output.payload) : String(error));
  process.exit(1);
});
