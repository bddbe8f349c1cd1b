// Verify thorn deliveries with Node's http module: Hook-HMAC and webhook-signature.
//   THORN_SECRET=... THORN_DIGEST=sha256 PORT=8000 node verify.js
const http = require("node:http");
const crypto = require("node:crypto");

const SECRET = process.env.THORN_SECRET;              // the subscriber's hmac_secret
const DIGEST = process.env.THORN_DIGEST || "sha256";  // its hmac_digest
const TOLERANCE = 5 * 60;                             // seconds either way

function safeEqual(a, b) {
  const x = Buffer.from(a);
  const y = Buffer.from(b || "");
  return x.length === y.length && crypto.timingSafeEqual(x, y);
}

function hookHmacOk(body, header) {
  return safeEqual(crypto.createHmac(DIGEST, SECRET).update(body).digest("base64"), header);
}

function webhookSignatureOk(body, id, timestamp, header) {
  if (!/^\d+$/.test(timestamp || "") || Math.abs(Date.now() / 1000 - Number(timestamp)) > TOLERANCE) {
    return false; // stale or replayed
  }
  const key = SECRET.startsWith("whsec_") ? Buffer.from(SECRET.slice(6), "base64") : Buffer.from(SECRET);
  const expected = "v1," + crypto.createHmac("sha256", key).update(`${id}.${timestamp}.`).update(body).digest("base64");
  return (header || "").split(" ").some((sig) => safeEqual(expected, sig));
}

http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = Buffer.concat(chunks); // the raw bytes: verify before parsing
    const h = req.headers;
    const ok = hookHmacOk(body, h["hook-hmac"]) &&
      webhookSignatureOk(body, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"]);
    // Deliveries are at-least-once: skip a webhook-id you have already seen.
    res.writeHead(ok ? 204 : 401).end();
  });
}).listen(Number(process.env.PORT || 8000), "127.0.0.1");
