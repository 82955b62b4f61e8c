// Fetches EC2 role credentials the way the AWS SDK for JavaScript v3 does
// (@aws-sdk/credential-providers fromInstanceMetadata, i.e. @smithy/credential-provider-imds),
// from the IMDS that AWS_EC2_METADATA_SERVICE_ENDPOINT points at. Optionally fetches twice
// (argv[2] = "twice") and also tries fromNodeProviderChain (argv[3] = "chain").
// Prints one JSON object; secrets are reduced to what the test compares.
"use strict";
const { fromInstanceMetadata, fromNodeProviderChain } = require("@aws-sdk/credential-providers");

function summary(creds) {
  return {
    accessKeyId: creds.accessKeyId,
    secretAccessKey: creds.secretAccessKey,
    sessionToken: creds.sessionToken,
    expiration: creds.expiration ? creds.expiration.toISOString() : null,
  };
}

async function main() {
  const warnings = [];
  const origWarn = console.warn;
  console.warn = (...args) => { warnings.push(args.join(" ")); };
  const report = { ok: true };
  try {
    const provider = fromInstanceMetadata({ timeout: 2000, maxRetries: 0 });
    report.first = summary(await provider());
    if (process.argv[2] === "twice") {
      report.second = summary(await provider());
    }
    if (process.argv[3] === "chain") {
      report.chain = summary(await fromNodeProviderChain()());
    }
  } catch (err) {
    report.ok = false;
    report.error = String((err && err.name) || "Error") + ": " + String(err && err.message);
  }
  console.warn = origWarn;
  report.warnings = warnings;
  process.stdout.write(JSON.stringify(report) + "\n");
}

main();
