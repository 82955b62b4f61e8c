// Command gcemeta exercises cloud.google.com/go/compute/metadata (the Debian
// golang-google-cloud-dev build, v0.56) against whatever GCE_METADATA_HOST
// points at, and reports what the library saw as JSON on stdout.
//
// Usage:
//
//	gcemeta info                        one JSON object with every helper's result
//	gcemeta subscribe <suffix> <stop>   one JSON line per value Subscribe delivers,
//	                                    until the value equals <stop> or is deleted
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"cloud.google.com/go/compute/metadata"
)

// errStop ends Subscribe once the stop marker arrives; it is not a failure.
var errStop = errors.New("stop marker seen")

// result keeps the value or the error text of one helper call, so a failing
// helper is visible to the test instead of aborting the whole run.
type result struct {
	Value interface{} `json:"value,omitempty"`
	Error string      `json:"error,omitempty"`
}

func capture(value interface{}, err error) result {
	if err != nil {
		return result{Error: err.Error()}
	}
	return result{Value: value}
}

func info() {
	out := map[string]interface{}{}
	out["on_gce"] = metadata.OnGCE()
	out["project_id"] = capture(metadata.ProjectID())
	out["numeric_project_id"] = capture(metadata.NumericProjectID())
	out["instance_id"] = capture(metadata.InstanceID())
	out["instance_name"] = capture(metadata.InstanceName())
	out["hostname"] = capture(metadata.Hostname())
	out["zone"] = capture(metadata.Zone())
	out["email"] = capture(metadata.Email(""))
	out["scopes"] = capture(metadata.Scopes(""))
	out["instance_tags"] = capture(metadata.InstanceTags())
	out["instance_attributes"] = capture(metadata.InstanceAttributes())
	out["project_attributes"] = capture(metadata.ProjectAttributes())
	out["internal_ip"] = capture(metadata.InternalIP())
	out["external_ip"] = capture(metadata.ExternalIP())
	// A key no server defines: the library must map the 404 to NotDefinedError.
	_, err := metadata.Get("instance/attributes/mds-test-key-that-does-not-exist")
	_, notDefined := err.(metadata.NotDefinedError)
	out["missing_is_not_defined"] = notDefined
	emit(out)
}

func subscribe(suffix, stop string) {
	err := metadata.Subscribe(suffix, func(value string, ok bool) error {
		emit(map[string]interface{}{"value": value, "ok": ok})
		if ok && value == stop {
			return errStop
		}
		return nil
	})
	if err != nil && err != errStop {
		emit(map[string]interface{}{"error": err.Error()})
		os.Exit(1)
	}
}

func emit(v interface{}) {
	line, err := json.Marshal(v)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	// os.Stdout is unbuffered, so each line reaches a reading test at once.
	fmt.Println(string(line))
}

func main() {
	if len(os.Args) >= 2 && os.Args[1] == "info" {
		info()
		return
	}
	if len(os.Args) == 4 && os.Args[1] == "subscribe" {
		subscribe(os.Args[2], os.Args[3])
		return
	}
	fmt.Fprintln(os.Stderr, "usage: gcemeta info | gcemeta subscribe <suffix> <stop>")
	os.Exit(2)
}
