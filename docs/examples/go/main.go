// Verify thorn deliveries in Go: Hook-HMAC and webhook-signature.
//
//	THORN_SECRET=... THORN_DIGEST=sha256 PORT=8000 go run main.go
package main

import (
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"hash"
	"io"
	"log"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

const tolerance = 5 * time.Minute // either way

var digests = map[string]func() hash.Hash{
	"sha1": sha1.New, "sha224": sha256.New224, "sha256": sha256.New,
	"sha384": sha512.New384, "sha512": sha512.New,
}

func mac(newHash func() hash.Hash, key []byte, parts ...[]byte) string {
	m := hmac.New(newHash, key)
	for _, p := range parts {
		m.Write(p)
	}
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

func hookHMACOK(secret, digest string, body []byte, header string) bool {
	newHash, ok := digests[digest]
	return ok && hmac.Equal([]byte(mac(newHash, []byte(secret), body)), []byte(header))
}

func webhookSignatureOK(secret string, body []byte, id, timestamp, header string) bool {
	ts, err := strconv.ParseInt(timestamp, 10, 64)
	if err != nil {
		return false
	}
	if age := time.Since(time.Unix(ts, 0)); age > tolerance || age < -tolerance {
		return false // stale or replayed
	}
	key := []byte(secret)
	if strings.HasPrefix(secret, "whsec_") {
		if key, err = base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_")); err != nil {
			return false
		}
	}
	expected := "v1," + mac(sha256.New, key, []byte(id+"."+timestamp+"."), body)
	for _, sig := range strings.Fields(header) {
		if hmac.Equal([]byte(expected), []byte(sig)) {
			return true
		}
	}
	return false
}

func main() {
	secret := os.Getenv("THORN_SECRET") // the subscriber's hmac_secret
	digest := os.Getenv("THORN_DIGEST") // its hmac_digest
	if digest == "" {
		digest = "sha256"
	}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20)) // the raw bytes: verify before parsing
		if err != nil || r.Method != http.MethodPost {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		if !hookHMACOK(secret, digest, body, r.Header.Get("Hook-HMAC")) ||
			!webhookSignatureOK(secret, body, r.Header.Get("webhook-id"),
				r.Header.Get("webhook-timestamp"), r.Header.Get("webhook-signature")) {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		// Deliveries are at-least-once: skip a webhook-id you have already seen.
		w.WriteHeader(http.StatusNoContent)
	})
	port := os.Getenv("PORT")
	if port == "" {
		port = "8000"
	}
	log.Fatal(http.ListenAndServe("127.0.0.1:"+port, nil))
}
