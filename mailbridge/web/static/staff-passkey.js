/* Passkeys for the staff console (WebAuthn). Loaded from our own origin only; the pages that
   use it allow script-src 'self' and nothing inline. */
(function () {
  "use strict";
  var meta = document.querySelector('meta[name="csrf-token"]');
  var csrf = meta ? meta.content : "";

  function bytes(text) {
    var b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) { b64 += "="; }
    return Uint8Array.from(atob(b64), function (c) { return c.charCodeAt(0); });
  }
  function text(buffer) {
    var chars = Array.from(new Uint8Array(buffer), function (b) { return String.fromCharCode(b); });
    return btoa(chars.join("")).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  function post(url, body) {
    return fetch(url, {method: "POST", credentials: "same-origin",
                       headers: {"X-CSRFToken": csrf, "Content-Type": "application/json"},
                       body: JSON.stringify(body || {})});
  }
  function say(message) {
    var el = document.getElementById("passkey-status");
    if (el) { el.textContent = message; }
  }
  function descriptors(list) {
    return (list || []).map(function (c) { return {type: c.type, id: bytes(c.id)}; });
  }

  async function add() {
    var options = await (await post("/staff/passkeys/options")).json();
    options.challenge = bytes(options.challenge);
    options.user.id = bytes(options.user.id);
    options.excludeCredentials = descriptors(options.excludeCredentials);
    var made = await navigator.credentials.create({publicKey: options});
    var answer = await post("/staff/passkeys", {
      id: made.id, rawId: text(made.rawId), type: made.type,
      response: {clientDataJSON: text(made.response.clientDataJSON),
                 attestationObject: text(made.response.attestationObject),
                 transports: made.response.getTransports ? made.response.getTransports() : []},
      clientExtensionResults: made.getClientExtensionResults()});
    if (answer.ok) { window.location.reload(); } else { say((await answer.json()).error); }
  }

  async function signIn() {
    var options = await (await post("/staff/passkey/options")).json();
    options.challenge = bytes(options.challenge);
    options.allowCredentials = descriptors(options.allowCredentials);
    var got = await navigator.credentials.get({publicKey: options});
    var r = got.response;
    var answer = await post("/staff/passkey/signin", {
      id: got.id, rawId: text(got.rawId), type: got.type,
      response: {clientDataJSON: text(r.clientDataJSON), authenticatorData: text(r.authenticatorData),
                 signature: text(r.signature), userHandle: r.userHandle ? text(r.userHandle) : null},
      clientExtensionResults: got.getClientExtensionResults()});
    var data = await answer.json();
    if (answer.ok) { window.location.assign(data.next); } else { say(data.error); }
  }

  function wire(id, action) {
    var button = document.getElementById(id);
    if (!button) { return; }
    if (!window.PublicKeyCredential) { button.disabled = true; say("This browser has no passkeys."); return; }
    button.addEventListener("click", function () {
      action().catch(function (error) { say("No passkey was used (" + error.name + ")."); });
    });
  }
  wire("passkey-add", add);
  wire("passkey-signin", signIn);
}());
