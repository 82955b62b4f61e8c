// Command idtoken exercises google.golang.org/api/idtoken (the Debian
// golang-google-api-dev build, v0.61): with no credentials file, NewTokenSource
// and NewClient fetch ID tokens from the metadata server's identity endpoint,
// and a Validator checks them against Google's certificate URL, which this
// program sends to the metadata server's /oauth2/v3/certs instead.
//
// Usage: idtoken AUDIENCE OTHER_AUDIENCE   prints one JSON object on stdout.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"time"

	"google.golang.org/api/idtoken"
	"google.golang.org/api/option"
)

// googleCertsURL is where idtoken's Validator fetches the keys of RS256 tokens.
const googleCertsURL = "https://www.googleapis.com/oauth2/v3/certs"

// certsRedirect serves Google's certificate URL from the metadata server and
// refuses every other URL, so validation can neither reach nor need the network.
type certsRedirect struct {
	target string
	mu     sync.Mutex
	seen   []string
}

func (c *certsRedirect) RoundTrip(req *http.Request) (*http.Response, error) {
	c.mu.Lock()
	c.seen = append(c.seen, req.URL.String())
	c.mu.Unlock()
	if req.URL.String() != googleCertsURL {
		return nil, fmt.Errorf("idtoken test: refusing to fetch %s", req.URL)
	}
	out, err := http.NewRequestWithContext(req.Context(), req.Method, c.target, nil)
	if err != nil {
		return nil, err
	}
	return http.DefaultTransport.RoundTrip(out)
}

type tokenReport struct {
	Token     string  `json:"token,omitempty"`
	TokenType string  `json:"token_type,omitempty"`
	Expiry    float64 `json:"expiry,omitempty"`
	Error     string  `json:"error,omitempty"`
}

type validation struct {
	Issuer   string                 `json:"iss,omitempty"`
	Audience string                 `json:"aud,omitempty"`
	Expires  int64                  `json:"exp,omitempty"`
	IssuedAt int64                  `json:"iat,omitempty"`
	Subject  string                 `json:"sub,omitempty"`
	Claims   map[string]interface{} `json:"claims,omitempty"`
	Error    string                 `json:"error,omitempty"`
}

func validate(ctx context.Context, v *idtoken.Validator, token, audience string) validation {
	payload, err := v.Validate(ctx, token, audience)
	if err != nil {
		return validation{Error: err.Error()}
	}
	return validation{
		Issuer: payload.Issuer, Audience: payload.Audience, Expires: payload.Expires,
		IssuedAt: payload.IssuedAt, Subject: payload.Subject, Claims: payload.Claims,
	}
}

// clientRequest sends one request through idtoken.NewClient to a loopback
// server and returns the Authorization header that server received.
func clientRequest(ctx context.Context, audience string) (string, error) {
	received := make(chan string, 1)
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		received <- r.Header.Get("Authorization")
	}))
	defer server.Close()
	client, err := idtoken.NewClient(ctx, audience)
	if err != nil {
		return "", err
	}
	res, err := client.Get(server.URL)
	if err != nil {
		return "", err
	}
	res.Body.Close()
	return <-received, nil
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: idtoken AUDIENCE OTHER_AUDIENCE")
		os.Exit(2)
	}
	audience, other := os.Args[1], os.Args[2]
	ctx := context.Background()
	out := map[string]interface{}{}

	redirect := &certsRedirect{target: "http://" + os.Getenv("GCE_METADATA_HOST") + "/oauth2/v3/certs"}
	validator, err := idtoken.NewValidator(ctx, option.WithHTTPClient(&http.Client{Transport: redirect}))
	if err != nil {
		fmt.Fprintln(os.Stderr, "NewValidator:", err)
		os.Exit(1)
	}

	source, err := idtoken.NewTokenSource(ctx, audience)
	if err != nil {
		out["token"] = tokenReport{Error: err.Error()}
	} else if token, err := source.Token(); err != nil {
		out["token"] = tokenReport{Error: err.Error()}
	} else {
		out["token"] = tokenReport{
			Token:     token.AccessToken,
			TokenType: token.Type(),
			Expiry:    float64(token.Expiry.UnixNano()) / float64(time.Second),
		}
		out["validated"] = validate(ctx, validator, token.AccessToken, audience)
		out["validated_for_other_audience"] = validate(ctx, validator, token.AccessToken, other)
	}
	if header, err := clientRequest(ctx, other); err != nil {
		out["client_authorization"] = map[string]string{"error": err.Error()}
	} else {
		out["client_authorization"] = map[string]string{"value": header}
	}
	redirect.mu.Lock()
	out["validator_fetched"] = redirect.seen
	redirect.mu.Unlock()

	line, err := json.Marshal(out)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Println(string(line))
}
