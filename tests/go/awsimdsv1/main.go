// Command awsimdsv1 exercises the AWS SDK for Go v1 (github.com/aws/aws-sdk-go,
// Debian's golang-github-aws-aws-sdk-go-dev) against whatever the environment
// points it at, and reports what the SDK saw as one JSON object on stdout.
//
//	awsimdsv1 imds  IMDS client (aws/ec2metadata), EC2 role credential provider
//	                (aws/credentials/ec2rolecreds), the session's default chain;
//	                AWS_EC2_METADATA_SERVICE_ENDPOINT selects the server.
//	awsimdsv1 ecs   container credential provider (aws/credentials/endpointcreds)
//	                and the default chain; AWS_CONTAINER_CREDENTIALS_FULL_URI and
//	                AWS_CONTAINER_AUTHORIZATION_TOKEN select the endpoint.
//
// An SDK error is reported as "<key>_error" and is not fatal; the exit status
// is non-zero only for a usage error or a session that cannot be created.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/aws/aws-sdk-go/aws/credentials"
	"github.com/aws/aws-sdk-go/aws/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go/aws/credentials/endpointcreds"
	"github.com/aws/aws-sdk-go/aws/ec2metadata"
	"github.com/aws/aws-sdk-go/aws/session"
)

type report map[string]interface{}

func (r report) put(key string, value interface{}, err error) {
	if err != nil {
		r[key+"_error"] = err.Error()
	} else {
		r[key] = value
	}
}

func rfc3339(t time.Time) string {
	return t.UTC().Format(time.RFC3339)
}

// credentials retrieves from creds as an application would (Get) and
// records the value under prefix_*.
func (r report) credentials(prefix string, creds *credentials.Credentials) {
	value, err := creds.Get()
	if err != nil {
		r[prefix+"_error"] = err.Error()
		return
	}
	r[prefix+"_provider"] = value.ProviderName
	r[prefix+"_access_key_id"] = value.AccessKeyID
	r[prefix+"_secret_access_key"] = value.SecretAccessKey
	r[prefix+"_session_token"] = value.SessionToken
	if expires, err := creds.ExpiresAt(); err == nil {
		r[prefix+"_expires"] = rfc3339(expires)
	}
}

func imds(sess *session.Session, r report) {
	client := ec2metadata.New(sess)
	r["available"] = client.Available()

	value, err := client.GetMetadata("instance-id")
	r.put("instance_id", value, err)
	value, err = client.GetMetadata("placement/availability-zone")
	r.put("availability_zone", value, err)
	value, err = client.GetMetadata("iam/security-credentials/")
	r.put("role_list", value, err)
	value, err = client.GetDynamicData("instance-identity/document")
	r.put("document_raw", value, err)
	value, err = client.GetUserData()
	r.put("user_data", value, err)
	value, err = client.Region()
	r.put("region", value, err)

	if doc, err := client.GetInstanceIdentityDocument(); err != nil {
		r["document_error"] = err.Error()
	} else {
		r["document"] = map[string]interface{}{
			"instanceId":       doc.InstanceID,
			"region":           doc.Region,
			"availabilityZone": doc.AvailabilityZone,
			"accountId":        doc.AccountID,
			"imageId":          doc.ImageID,
			"instanceType":     doc.InstanceType,
			"architecture":     doc.Architecture,
			"privateIp":        doc.PrivateIP,
			"version":          doc.Version,
			"pendingTime":      rfc3339(doc.PendingTime),
		}
	}
	if info, err := client.IAMInfo(); err != nil {
		r["iam_info_error"] = err.Error()
	} else {
		r["iam_info"] = map[string]interface{}{
			"Code":               info.Code,
			"LastUpdated":        rfc3339(info.LastUpdated),
			"InstanceProfileArn": info.InstanceProfileArn,
			"InstanceProfileId":  info.InstanceProfileID,
		}
	}

	r.credentials("role", ec2rolecreds.NewCredentialsWithClient(client))
}

func ecs(sess *session.Session, r report) {
	creds := endpointcreds.NewCredentialsClient(*sess.Config, sess.Handlers,
		os.Getenv("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
		func(p *endpointcreds.Provider) {
			p.AuthorizationToken = os.Getenv("AWS_CONTAINER_AUTHORIZATION_TOKEN")
		})
	r.credentials("ecs", creds)
}

func main() {
	if len(os.Args) != 2 || (os.Args[1] != "imds" && os.Args[1] != "ecs") {
		fmt.Fprintln(os.Stderr, "usage: awsimdsv1 imds|ecs")
		os.Exit(2)
	}
	r := report{"mode": os.Args[1]}
	sess, err := session.NewSession()
	if err != nil {
		r["session_error"] = err.Error()
		json.NewEncoder(os.Stdout).Encode(r)
		os.Exit(1)
	}
	if os.Args[1] == "imds" {
		imds(sess, r)
	} else {
		ecs(sess, r)
	}
	// The session's default chain: environment, shared files, then the remote
	// provider (the container endpoint when its variable is set, else EC2 role).
	r.credentials("chain", sess.Config.Credentials)
	json.NewEncoder(os.Stdout).Encode(r)
}
