<?php
// Verify thorn deliveries in PHP: Hook-HMAC and webhook-signature.
//   THORN_SECRET=... THORN_DIGEST=sha256 php -S 127.0.0.1:8000 verify.php

const TOLERANCE = 300; // seconds either way

function hook_hmac_ok(string $secret, string $digest, string $body, string $header): bool
{
    return hash_equals(base64_encode(hash_hmac($digest, $body, $secret, true)), $header);
}

function webhook_signature_ok(string $secret, string $body, string $id, string $timestamp, string $header): bool
{
    if (!ctype_digit($timestamp) || abs(time() - (int) $timestamp) > TOLERANCE) {
        return false; // stale or replayed
    }
    $key = str_starts_with($secret, 'whsec_') ? base64_decode(substr($secret, 6)) : $secret;
    $expected = 'v1,' . base64_encode(hash_hmac('sha256', "$id.$timestamp.$body", $key, true));
    foreach (explode(' ', $header) as $signature) {
        if (hash_equals($expected, $signature)) {
            return true;
        }
    }
    return false;
}

$secret = getenv('THORN_SECRET');            // the subscriber's hmac_secret
$digest = getenv('THORN_DIGEST') ?: 'sha256'; // its hmac_digest
$body = file_get_contents('php://input');    // the raw bytes: verify before parsing
$header = fn (string $name): string => $_SERVER['HTTP_' . strtoupper(str_replace('-', '_', $name))] ?? '';

$ok = hook_hmac_ok($secret, $digest, $body, $header('Hook-HMAC'))
    && webhook_signature_ok($secret, $body, $header('webhook-id'), $header('webhook-timestamp'), $header('webhook-signature'));
// Deliveries are at-least-once: skip a webhook-id you have already seen.
http_response_code($ok ? 204 : 401);
