// Command gcemeta exercises cloud.google.com/go/compute/metadata (the Debian
// golang-google-cloud-dev build, v0.56) against whatever GCE_METADATA_HOST
// points at, and reports what the library saw as JSON on stdout.
//
// Usage:
//
//	gcemeta info [flags]                one JSON object with every helper's result
//	    -instance-attr NAME             also InstanceAttributeValue(NAME) (repeatable)
//	    -project-attr NAME              also ProjectAttributeValue(NAME) (repeatable)
//	    -account NAME                   also Email(NAME) and Scopes(NAME) (repeatable;
//	                                    "" is the library's own default)
//	    -get SUFFIX                     also Get(SUFFIX), the suffix sent as written
//	                                    (repeatable)
//	gcemeta subscribe <suffix> <stop>   one JSON line per value Subscribe delivers,
//	                                    until the value equals <stop> or is deleted
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

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

// lookup is the outcome of one string-valued call whose value may be empty:
// unlike result, the value is always present, and a NotDefinedError (the
// library's reading of a 404) is told apart from every other error together
// with the suffix the library says was missing.
type lookup struct {
	Value            string `json:"value"`
	Error            string `json:"error,omitempty"`
	NotDefined       bool   `json:"not_defined,omitempty"`
	NotDefinedSuffix string `json:"not_defined_suffix,omitempty"`
}

func look(value string, err error) lookup {
	if err == nil {
		return lookup{Value: value}
	}
	out := lookup{Value: value, Error: err.Error()}
	if suffix, ok := err.(metadata.NotDefinedError); ok {
		out.NotDefined = true
		out.NotDefinedSuffix = string(suffix)
	}
	return out
}

// names collects a repeatable string flag.
type names []string

func (n *names) String() string     { return strings.Join(*n, ",") }
func (n *names) Set(v string) error { *n = append(*n, v); return nil }

// trimmedSuffixes are the paths behind the helpers that strings.TrimSpace
// their answer; info also reports each untrimmed (metadata.Get), so a test
// can tell whether the trimming changed anything.
var trimmedSuffixes = []string{
	"project/project-id",
	"project/numeric-project-id",
	"instance/id",
	"instance/name",
	"instance/hostname",
	"instance/zone",
	"instance/network-interfaces/0/ip",
	"instance/network-interfaces/0/access-configs/0/external-ip",
	"instance/service-accounts/default/email",
}

func info(args []string) {
	var instanceAttrs, projectAttrs, accounts, suffixes names
	flags := flag.NewFlagSet("info", flag.ExitOnError)
	flags.Var(&instanceAttrs, "instance-attr", "InstanceAttributeValue of `NAME`")
	flags.Var(&projectAttrs, "project-attr", "ProjectAttributeValue of `NAME`")
	flags.Var(&accounts, "account", "Email and Scopes of service account `NAME`")
	flags.Var(&suffixes, "get", "Get(`SUFFIX`)")
	flags.Parse(args)

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

	raw := map[string]lookup{}
	for _, suffix := range trimmedSuffixes {
		raw[suffix] = look(metadata.Get(suffix))
	}
	out["raw"] = raw
	instanceValues := map[string]lookup{}
	for _, name := range instanceAttrs {
		instanceValues[name] = look(metadata.InstanceAttributeValue(name))
	}
	out["instance_attribute_values"] = instanceValues
	projectValues := map[string]lookup{}
	for _, name := range projectAttrs {
		projectValues[name] = look(metadata.ProjectAttributeValue(name))
	}
	out["project_attribute_values"] = projectValues
	accountInfo := map[string]interface{}{}
	for _, name := range accounts {
		accountInfo[name] = map[string]interface{}{
			"email":  capture(metadata.Email(name)),
			"scopes": capture(metadata.Scopes(name)),
		}
	}
	out["accounts"] = accountInfo
	gets := map[string]lookup{}
	for _, suffix := range suffixes {
		gets[suffix] = look(metadata.Get(suffix))
	}
	out["get"] = gets
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
		_, notDefined := err.(metadata.NotDefinedError)
		emit(map[string]interface{}{"error": err.Error(), "not_defined": notDefined})
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
		info(os.Args[2:])
		return
	}
	if len(os.Args) == 4 && os.Args[1] == "subscribe" {
		subscribe(os.Args[2], os.Args[3])
		return
	}
	fmt.Fprintln(os.Stderr, "usage: gcemeta info [flags] | gcemeta subscribe <suffix> <stop>")
	os.Exit(2)
}
