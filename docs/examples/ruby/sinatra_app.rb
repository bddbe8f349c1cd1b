# Verify thorn deliveries in Sinatra: Hook-HMAC and webhook-signature.
#   THORN_SECRET=... THORN_DIGEST=sha256 PORT=4567 ruby sinatra_app.rb
require "sinatra"
require "openssl"
require "base64"
require "rack/utils"

SECRET = ENV.fetch("THORN_SECRET")             # the subscriber's hmac_secret
DIGEST = ENV.fetch("THORN_DIGEST", "sha256")   # its hmac_digest
TOLERANCE = 5 * 60                             # seconds either way

set :bind, "127.0.0.1"
set :port, ENV.fetch("PORT", "4567").to_i

def hook_hmac_ok?(body, header)
  expected = Base64.strict_encode64(OpenSSL::HMAC.digest(DIGEST, SECRET, body))
  Rack::Utils.secure_compare(expected, header.to_s)
end

def webhook_signature_ok?(body, id, timestamp, header)
  return false unless timestamp.to_s.match?(/\A\d+\z/)
  return false if (Time.now.to_i - timestamp.to_i).abs > TOLERANCE # stale or replayed

  key = SECRET.start_with?("whsec_") ? Base64.decode64(SECRET.delete_prefix("whsec_")) : SECRET
  signed = "#{id}.#{timestamp}.".b + body
  expected = "v1," + Base64.strict_encode64(OpenSSL::HMAC.digest("sha256", key, signed))
  header.to_s.split(" ").any? { |sig| Rack::Utils.secure_compare(expected, sig) }
end

post "/*" do
  body = request.body.read # the raw bytes: verify before parsing
  ok = hook_hmac_ok?(body, request.env["HTTP_HOOK_HMAC"]) &&
       webhook_signature_ok?(body, request.env["HTTP_WEBHOOK_ID"],
                             request.env["HTTP_WEBHOOK_TIMESTAMP"], request.env["HTTP_WEBHOOK_SIGNATURE"])
  halt 401 unless ok
  # Deliveries are at-least-once: skip a webhook-id you have already seen.
  status 204
end
