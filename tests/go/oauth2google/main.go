// Command oauth2google exercises golang.org/x/oauth2/google (the Debian
// golang-golang-x-oauth2-google-dev build, v0.3.0): Application Default
// Credentials detection and the Compute Engine token source, both of which
// read the metadata server named by GCE_METADATA_HOST.
//
// Usage: oauth2google [-account EMAIL] [scope ...]   prints one JSON object on stdout.
//
// ADC always uses the default account; compute_token comes from
// ComputeTokenSource(EMAIL, scope...), so "" (the default) is the library's own
// choice of account.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/google"
)

// tokenReport is what the test compares with the server's token endpoint;
// expiry is sent as epoch seconds so Python need not parse Go time layouts.
type tokenReport struct {
	AccessToken string  `json:"access_token,omitempty"`
	TokenType   string  `json:"token_type,omitempty"`
	Expiry      float64 `json:"expiry,omitempty"`
	Error       string  `json:"error,omitempty"`
}

func report(source oauth2.TokenSource) tokenReport {
	token, err := source.Token()
	if err != nil {
		return tokenReport{Error: err.Error()}
	}
	return tokenReport{
		AccessToken: token.AccessToken,
		TokenType:   token.Type(),
		Expiry:      float64(token.Expiry.UnixNano()) / float64(time.Second),
	}
}

func main() {
	account := flag.String("account", "", "service account for ComputeTokenSource")
	flag.Parse()
	ctx := context.Background()
	scopes := flag.Args()
	out := map[string]interface{}{}

	creds, err := google.FindDefaultCredentials(ctx, scopes...)
	if err != nil {
		out["adc_error"] = err.Error()
	} else {
		out["adc_project_id"] = creds.ProjectID
		out["adc_token"] = report(creds.TokenSource)
	}
	out["compute_token"] = report(google.ComputeTokenSource(*account, scopes...))

	line, err := json.Marshal(out)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Println(string(line))
}
