// Asks google-auth-library (through gcp-metadata) for an access token from the metadata
// server named by GCE_METADATA_HOST and prints {"token"} or {"error"} as JSON.
//
// Usage: node gce_token.js
'use strict';

const {GoogleAuth} = require('google-auth-library');

async function main() {
  const auth = new GoogleAuth({scopes: ['https://www.googleapis.com/auth/cloud-platform']});
  let report;
  try {
    report = {token: await auth.getAccessToken()};
  } catch (err) {
    report = {error: String((err && err.message) || err)};
  }
  process.stdout.write(JSON.stringify(report) + '\n');
}

main().catch((err) => {
  process.stderr.write(String((err && err.stack) || err) + '\n');
  process.exit(1);
});
