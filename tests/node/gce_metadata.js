// Drives more of gcp-metadata and google-auth-library against the metadata server named by
// GCE_METADATA_HOST and prints one JSON object with what they saw. Each call is captured
// separately, so one failing call shows up as {error, status} instead of hiding the others.
//
// Usage:
//   node gce_metadata.js report '<spec JSON>'
//     spec: {instance_attributes: [names], project_attributes: [names], missing: name,
//            bulk: [metadata keys], universe: bool, scopes: [scopes], accounts: [emails],
//            audience: string}
//   node gce_metadata.js detect [client]
//     isAvailable() / getGCPResidency() under the METADATA_SERVER_DETECTION of the env and,
//     with `client`, the class of GoogleAuth's client.
//   node gce_metadata.js watch <instance|project> <property> <stop-value>
//     reads the property, then waits for changes with wait_for_change=true, printing one
//     {value} line per value seen, until the value equals stop-value.
'use strict';

const gcpMetadata = require('gcp-metadata');
const {Compute, GoogleAuth, OAuth2Client} = require('google-auth-library');

// json-bigint hands big numbers back as BigNumbers (or BigInts if so configured): report
// their exact decimal text, wherever they sit in the value, so precision loss shows.
function describe(value) {
  if (typeof value === 'bigint') {
    return {bignumber: value.toString()};
  }
  if (value === null || typeof value !== 'object') {
    return value;
  }
  if (value.constructor && value.constructor.name === 'BigNumber') {
    return {bignumber: value.toFixed()};
  }
  if (Array.isArray(value)) {
    return value.map(describe);
  }
  const out = {};
  for (const [key, item] of Object.entries(value)) {
    out[key] = describe(item);
  }
  return out;
}

async function capture(call) {
  try {
    const value = await call();
    return {value: describe(value), type: typeof value};
  } catch (err) {
    const report = {error: String((err && err.message) || err)};
    if (err && err.name) {
      report.name = err.name;
    }
    if (err && err.constructor) {
      report.class = err.constructor.name;
    }
    if (err && err.status !== undefined) {
      report.status = err.status;
    } else if (err && err.response && err.response.status !== undefined) {
      report.status = err.response.status;
    }
    return report;
  }
}

function serverUrl() {
  const host = process.env.GCE_METADATA_HOST;
  return /^https?:\/\//.test(host) ? host : `http://${host}`;
}

async function report(spec) {
  const out = {instance_attributes: {}, project_attributes: {}};
  for (const name of spec.instance_attributes || []) {
    out.instance_attributes[name] =
      await capture(() => gcpMetadata.instance({property: `attributes/${name}`}));
  }
  for (const name of spec.project_attributes || []) {
    out.project_attributes[name] = await capture(() => gcpMetadata.project(`attributes/${name}`));
  }
  if (spec.missing) {
    out.missing_instance_attribute =
      await capture(() => gcpMetadata.instance({property: `attributes/${spec.missing}`}));
    out.missing_project_attribute =
      await capture(() => gcpMetadata.project(`attributes/${spec.missing}`));
  }
  out.tags = await capture(() => gcpMetadata.instance({property: 'tags'}));
  out.recursive_instance =
    await capture(() => gcpMetadata.instance({params: {recursive: true}}));
  out.recursive_project = await capture(() => gcpMetadata.project({params: {recursive: true}}));
  if (spec.bulk) {
    out.bulk = await capture(() => gcpMetadata.bulk(spec.bulk.map((key) => ({metadataKey: key}))));
  }
  if (spec.universe) {
    out.universe = await capture(() => gcpMetadata.universe('universe-domain'));
    // GoogleAuth.getUniverseDomain() takes a Compute client's own (default) universe, not
    // the server's; this is the library's metadata-server lookup.
    out.auth_universe =
      await capture(() => new GoogleAuth().getUniverseDomainFromMetadataServer());
  }

  const auth = new GoogleAuth({scopes: spec.scopes});
  out.auth_access_token = await capture(() => auth.getAccessToken());
  out.auth_email = await capture(async () => (await auth.getCredentials()).client_email);

  const verifier = new OAuth2Client({endpoints: {
    oauth2FederatedSignonPemCertsUrl: `${serverUrl()}/oauth2/v1/certs`,
    oauth2FederatedSignonJwkCertsUrl: `${serverUrl()}/oauth2/v3/certs`,
  }});
  if (spec.audience) {
    out.id_token = await capture(async () => {
      const client = await auth.getIdTokenClient(spec.audience);
      return client.idTokenProvider.fetchIdToken(spec.audience);
    });
    if ('value' in out.id_token) {
      out.id_token_verified = await capture(async () => {
        const ticket = await verifier.verifyIdToken(
          {idToken: out.id_token.value, audience: spec.audience});
        return ticket.getPayload();
      });
    }
  }

  out.accounts = {};
  for (const email of spec.accounts || []) {
    const compute = new Compute({serviceAccountEmail: email, scopes: spec.scopes});
    const seen = {};
    seen.access_token = await capture(async () => (await compute.getAccessToken()).token);
    if (spec.audience) {
      seen.id_token = await capture(() => compute.fetchIdToken(spec.audience));
    }
    out.accounts[email] = seen;
  }
  return out;
}

async function detect(withClient) {
  const out = {};
  out.is_available = await capture(() => gcpMetadata.isAvailable());
  out.residency = await capture(() => gcpMetadata.getGCPResidency());
  if (withClient) {
    // What google-auth-library makes of it: a Compute client, or no credentials at all.
    // (Not asked of a dead server it was told is there: it retries for a good while.)
    out.auth_client_class = await capture(
      async () => (await new GoogleAuth().getClient()).constructor.name);
  }
  return out;
}

async function watch(kind, property, stop) {
  // Off GCP, gcp-metadata gives each request 3 s; on GCP (as here, where the test plays
  // the VM) none, so a wait_for_change may hang as long as the server holds it.
  gcpMetadata.setGCPResidency(true);
  const read = kind === 'project' ? gcpMetadata.project : gcpMetadata.instance;
  let value = await read({property});
  process.stdout.write(JSON.stringify({value: describe(value)}) + '\n');
  // gcp-metadata returns bodies only, no ETag, so each wait is "until it next changes".
  while (value !== stop) {
    value = await read({property, params: {wait_for_change: true}});
    process.stdout.write(JSON.stringify({value: describe(value)}) + '\n');
  }
}

async function main() {
  const [mode, ...args] = process.argv.slice(2);
  if (mode === 'report') {
    process.stdout.write(JSON.stringify(await report(JSON.parse(args[0]))) + '\n');
  } else if (mode === 'detect') {
    process.stdout.write(JSON.stringify(await detect(args[0] === 'client')) + '\n');
  } else if (mode === 'watch') {
    await watch(args[0], args[1], args[2]);
  } else {
    throw new Error('usage: node gce_metadata.js report <spec> | detect [client] | watch ...');
  }
}

main().catch((err) => {
  process.stderr.write(String((err && err.stack) || err) + '\n');
  process.exit(1);
});
