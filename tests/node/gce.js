// Drives the real Node GCE clients (gcp-metadata, google-auth-library) against
// the metadata server named by GCE_METADATA_HOST and prints one JSON object
// with what they saw. Each call is captured separately so one failing call
// shows up as {error} in the report instead of hiding the others.
//
// Usage: node gce.js <id-token-audience>
'use strict';

const gcpMetadata = require('gcp-metadata');
const {GoogleAuth} = require('google-auth-library');

async function capture(call) {
  try {
    return {value: describe(await call())};
  } catch (err) {
    return {error: String((err && err.message) || err)};
  }
}

// gcp-metadata parses bodies with json-bigint, so a large numeric id arrives
// as a BigNumber: report its decimal text plus the JS type the caller got.
function describe(value) {
  if (value !== null && typeof value === 'object' && value.constructor &&
      value.constructor.name === 'BigNumber') {
    return {bignumber: value.toFixed()};
  }
  return value;
}

async function main() {
  const audience = process.argv[2];
  if (!audience) {
    throw new Error('usage: node gce.js <id-token-audience>');
  }
  const out = {};
  out.is_available = await capture(() => gcpMetadata.isAvailable());
  out.project_id = await capture(() => gcpMetadata.project('project-id'));
  out.numeric_project_id = await capture(() => gcpMetadata.project('numeric-project-id'));
  const instanceId = await capture(() => gcpMetadata.instance('id'));
  out.instance_id = instanceId;
  out.instance_id_type = 'value' in instanceId ? typeof instanceId.value : null;
  out.scopes = await capture(() => gcpMetadata.instance('service-accounts/default/scopes'));
  out.recursive_service_accounts = await capture(
    () => gcpMetadata.instance({property: 'service-accounts/', params: {recursive: 'true'}}));

  const auth = new GoogleAuth({scopes: ['https://www.googleapis.com/auth/cloud-platform']});
  out.auth_project_id = await capture(() => auth.getProjectId());
  out.auth_access_token = await capture(() => auth.getAccessToken());
  out.auth_email = await capture(async () => (await auth.getCredentials()).client_email);
  out.auth_client_class = await capture(async () => (await auth.getClient()).constructor.name);
  out.id_token = await capture(async () => {
    const client = await auth.getIdTokenClient(audience);
    return client.idTokenProvider.fetchIdToken(audience);
  });
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(String((err && err.stack) || err) + '\n');
  process.exit(1);
});
