// Command awsimds exercises the AWS SDK for Go v2 IMDS client
// (github.com/aws/aws-sdk-go-v2/feature/ec2/imds) and EC2 role credential
// provider (credentials/ec2rolecreds), Debian's golang-github-aws-aws-sdk-go-v2-dev
// build, against whatever AWS_EC2_METADATA_SERVICE_ENDPOINT points at, and
// reports what the SDK saw as one JSON object on stdout.
package main

import (
	"context"
	"encoding/json"
	"io/ioutil"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out := map[string]interface{}{}
	client := imds.New(imds.Options{})

	if region, err := client.GetRegion(ctx, &imds.GetRegionInput{}); err != nil {
		out["region_error"] = errText(err)
	} else {
		out["region"] = region.Region
	}
	if doc, err := client.GetInstanceIdentityDocument(ctx, &imds.GetInstanceIdentityDocumentInput{}); err != nil {
		out["document_error"] = errText(err)
	} else {
		out["instance_id"] = doc.InstanceID
		out["availability_zone"] = doc.AvailabilityZone
		out["pending_time"] = doc.PendingTime.UTC().Format(time.RFC3339)
		out["account_id"] = doc.AccountID
	}
	if md, err := client.GetMetadata(ctx, &imds.GetMetadataInput{Path: "instance-id"}); err != nil {
		out["metadata_error"] = errText(err)
	} else {
		body, _ := ioutil.ReadAll(md.Content)
		md.Content.Close()
		out["metadata_instance_id"] = string(body)
	}
	if info, err := client.GetIAMInfo(ctx, &imds.GetIAMInfoInput{}); err != nil {
		out["iam_info_error"] = errText(err)
	} else {
		out["instance_profile_arn"] = info.InstanceProfileArn
	}
	provider := ec2rolecreds.New()
	if creds, err := provider.Retrieve(ctx); err != nil {
		out["credentials_error"] = errText(err)
	} else {
		out["access_key_id"] = creds.AccessKeyID
		out["secret_access_key"] = creds.SecretAccessKey
		out["session_token"] = creds.SessionToken
		out["can_expire"] = creds.CanExpire
		out["expires"] = creds.Expires.UTC().Format(time.RFC3339)
		out["source"] = creds.Source
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
