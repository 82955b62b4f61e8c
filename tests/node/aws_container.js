// Fetches container credentials as the AWS SDK for JavaScript v3 does on ECS/EKS:
// fromContainerMetadata and fromHttp (both from @aws-sdk/credential-providers), reading
// AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN.
// argv[2] picks the provider: "container" or "http". Prints one JSON object.
"use strict";
const { fromContainerMetadata, fromHttp } = require("@aws-sdk/credential-providers");

async function main() {
  const warnings = [];
  const origWarn = console.warn;
  console.warn = (...args) => { warnings.push(args.join(" ")); };
  const report = { ok: true, provider: process.argv[2] };
  try {
    const provider = process.argv[2] === "http"
      ? fromHttp({ timeout: 2000, maxRetries: 0 })
      : fromContainerMetadata({ timeout: 2000, maxRetries: 0 });
    const creds = await provider();
    report.accessKeyId = creds.accessKeyId;
    report.sessionToken = creds.sessionToken;
    report.expiration = creds.expiration ? creds.expiration.toISOString() : null;
    report.accountId = creds.accountId || null;
  } catch (err) {
    report.ok = false;
    report.error = String((err && err.name) || "Error") + ": " + String(err && err.message);
  }
  console.warn = origWarn;
  report.warnings = warnings;
  process.stdout.write(JSON.stringify(report) + "\n");
}

main();
