// The landing page's live login test: Spotify's Authorization Code flow with PKCE, the code swapped at this
// service's /swap, the sealed refresh token refreshed at /refresh. Tokens live in this script's memory only;
// the PKCE verifier and the state wait in sessionStorage while the browser is at the accounts service.
"use strict";

(() => {
  const PENDING = "tokenswap.login";
  const $ = (id) => document.getElementById(id);
  const section = $("login");

  // The address bar holds the authorization code (or an error) after the redirect: take it out in any case.
  const params = new URLSearchParams(location.search);
  if (location.search) history.replaceState(null, "", location.pathname);
  if (!section) return; // this page's /callback is not allowed: the page says what to add, and where

  const settings = section.dataset;
  let tokens = null; // the last answer's access token and sealed refresh token

  function base64url(bytes) {
    let binary = "";
    for (const byte of new Uint8Array(bytes)) binary += String.fromCharCode(byte);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  const randomString = () => base64url(crypto.getRandomValues(new Uint8Array(32)));

  function show(id, text) {
    const element = $(id);
    element.textContent = text;
    element.hidden = false;
  }

  // What a login, a cancel or a refresh came to: scrolled into view (after a login, the page loads at its top,
  // far above it), said by screen readers through the live region, and with the focus moved there when asked,
  // so that the keyboard goes on from the result.
  function reveal(id, message, { focus = true } = {}) {
    const element = $(id);
    element.scrollIntoView({ block: "nearest" });
    if (focus) element.focus({ preventScroll: true });
    $("announce").textContent = message;
  }

  function hint(error, description) {
    const redirect = settings.redirectUri;
    if (error === "access_denied") {
      return "The login was cancelled on the consent screen. Press \u201cLog in with Spotify\u201d to try again.";
    }
    if (error === "invalid_client" || (error === "server_error" && /misconfigured/i.test(description))) {
      // The service answers a 500 when Spotify refuses its own credentials (its log names the setting).
      return "Spotify did not accept this service's client credentials: check SPOTIFY_CLIENT_ID and " +
        "SPOTIFY_CLIENT_SECRET against your app in the Spotify developer dashboard, then restart the service.";
    }
    if (/redirect.uri/i.test(description)) {
      return `Spotify does not know ${redirect} as a redirect URI of this app: add it to your app's Redirect ` +
        "URIs in the Spotify developer dashboard, and to SPOTIFY_CLIENT_CALLBACK_URL.";
    }
    if (error === "invalid_grant" && /code_verifier/i.test(description)) {
      return "The PKCE verifier did not match the login's challenge: start again from this page.";
    }
    if (error === "invalid_grant") {
      return "An authorization code works once, for a few minutes; a refresh token stops working when the " +
        "user removes the app's access. Log in again.";
    }
    if (error === "state_mismatch") {
      return "This tab did not start that login, or has finished it already: start again from this page.";
    }
    if (error === "rate_limited" || error === "temporarily_unavailable") {
      return "Wait a little and try again.";
    }
    if (error === "forbidden") {
      return "While a Spotify app is in development mode, only the users listed under User Management in the " +
        "dashboard may use the Web API.";
    }
    if (error === "network_error") {
      return "The browser could not reach it: is the service (or the accounts service) running?";
    }
    if (error === "insecure_context") {
      return "Open this page over https, or at http://127.0.0.1.";
    }
    if (error === "server_error") {
      return "Spotify, or this service, failed: the service's log says more.";
    }
    return "";
  }

  function showError(error, description) {
    $("progress").hidden = true;
    $("error-code").textContent = error;
    $("error-description").textContent = description || "(no description)";
    $("error-hint").textContent = hint(error, description || "");
    $("error").hidden = false;
    reveal("error", `${error}: ${$("error-description").textContent}`);
  }

  class Failure extends Error {
    constructor(error, description) {
      super(description);
      this.error = error;
    }
  }

  function expiry(seconds) {
    const at = new Date(Date.now() + seconds * 1000);
    return `in ${seconds} seconds, at ${at.toLocaleTimeString()}`;
  }

  // POST a form to this service; the JSON answer, or a Failure with the error and its description.
  async function post(path, fields) {
    let response;
    try {
      response = await fetch(settings.base + path, { method: "POST", body: new URLSearchParams(fields) });
    } catch (err) {
      throw new Failure("network_error", `${path} could not be reached (${err.message})`);
    }
    const body = await response.json().catch(() => null);
    if (!body) throw new Failure("server_error", `${path} answered HTTP ${response.status} without JSON`);
    if (!response.ok) throw new Failure(body.error || `http_${response.status}`, body.error_description);
    return body;
  }

  async function displayName(accessToken) {
    let response;
    try {
      response = await fetch(settings.apiUrl + "/v1/me", { headers: { Authorization: "Bearer " + accessToken } });
    } catch (err) {
      throw new Failure("network_error", `The Web API at ${settings.apiUrl} could not be reached (${err.message})`);
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = (body.error && body.error.message) || `HTTP ${response.status}`;
      throw new Failure(response.status === 403 ? "forbidden" : `web_api_${response.status}`,
        `${settings.apiUrl}/v1/me: ${message}`);
    }
    return body.display_name || body.id || "(no display name)";
  }

  async function startLogin() {
    if (!window.isSecureContext || !crypto.subtle) {
      showError("insecure_context", "PKCE needs the browser's Web Crypto, which works only on secure pages.");
      return;
    }
    const verifier = randomString();
    const state = randomString();
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
    sessionStorage.setItem(PENDING, JSON.stringify({ verifier, state }));
    const query = new URLSearchParams({
      client_id: settings.clientId,
      response_type: "code",
      redirect_uri: settings.redirectUri,
      state,
      scope: settings.scope,
      code_challenge_method: "S256",
      code_challenge: base64url(digest),
    });
    location.assign(`${settings.accountsUrl}/authorize?${query}`);
  }

  async function finishLogin() {
    const pending = JSON.parse(sessionStorage.getItem(PENDING) || "null");
    sessionStorage.removeItem(PENDING);
    if (params.has("error")) {
      throw new Failure(params.get("error"), params.get("error_description") || "The login did not finish.");
    }
    if (!pending || params.get("state") !== pending.state) {
      throw new Failure("state_mismatch", "The state sent back is not the one this tab sent.");
    }
    show("progress", "Swapping the code at /swap\u2026");
    tokens = await post("/swap", {
      code: params.get("code"),
      redirect_uri: settings.redirectUri,
      code_verifier: pending.verifier,
    });
    $("token-type").textContent = tokens.token_type;
    $("scope").textContent = tokens.scope || "(none)";
    $("expires").textContent = expiry(tokens.expires_in);
    $("sealed").textContent = tokens.refresh_token
      ? "came back sealed by this service (Spotify's own refresh token never reaches the browser)"
      : "none in the answer";
    $("refresh-button").hidden = !tokens.refresh_token;
    $("result").hidden = false;
    $("progress").hidden = true;
    $("user").textContent = "Logged in as " + await displayName(tokens.access_token);
    reveal("result", $("user").textContent);
  }

  async function refresh() {
    const button = $("refresh-button");
    $("error").hidden = true;
    button.disabled = true; // a disabled button loses the focus: it gets it back below
    try {
      const answer = await post("/refresh", { refresh_token: tokens.refresh_token });
      tokens = { ...answer, refresh_token: answer.refresh_token || tokens.refresh_token };
      $("expires").textContent = expiry(answer.expires_in);
      $("refreshed").textContent = `Refreshed at ${new Date().toLocaleTimeString()}: a new access token.`;
      // The focus stays on the button, for the next refresh.
      reveal("refreshed", $("refreshed").textContent, { focus: false });
    } finally {
      button.disabled = false;
      if (document.activeElement === document.body) button.focus({ preventScroll: true });
    }
  }

  const reportFailures = (action) => () => action().catch((err) => {
    if (err instanceof Failure) showError(err.error, err.message);
    else showError("page_error", String(err));
  });

  $("login-button").addEventListener("click", reportFailures(startLogin));
  $("refresh-button").addEventListener("click", reportFailures(refresh));
  if (location.pathname.endsWith("/callback") && (params.has("code") || params.has("error"))) {
    reportFailures(finishLogin)();
  }
})();
