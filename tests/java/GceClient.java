// Drives the Java Google auth library (google-auth-library-java, Debian's
// libgoogle-auth-java) against the metadata server named by GCE_METADATA_HOST
// and prints one JSON object with what it saw (tests/test_java_clients.py).
//
// Usage: java GceClient STEP...   where STEP is one of
//   adc                      GoogleCredentials.getApplicationDefault(); later steps use it
//   token                    refreshAccessToken() of the Compute Engine credentials
//   account                  getAccount() (the default service account's e-mail)
//   metadata                 getRequestMetadata(URI): the Authorization header sent to APIs
//   idtoken AUDIENCE FORMAT  IdTokenCredentials with the credentials as IdTokenProvider;
//                            FORMAT is standard, full or full-licenses
// Each step's result is {"value": ...} or {"error": "Class: message <- cause..."} under
// the step's name ("idtoken/FORMAT" for identity tokens); a failed step does not stop
// the later ones. Without an adc step the steps use ComputeEngineCredentials.create().

import com.google.auth.oauth2.AccessToken;
import com.google.auth.oauth2.ComputeEngineCredentials;
import com.google.auth.oauth2.GoogleCredentials;
import com.google.auth.oauth2.IdToken;
import com.google.auth.oauth2.IdTokenCredentials;
import com.google.auth.oauth2.IdTokenProvider;
import com.google.gson.GsonBuilder;
import java.net.URI;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

public final class GceClient {
  private interface Step {
    Object run() throws Exception;
  }

  private static GoogleCredentials credentials;

  private static GoogleCredentials credentials() {
    if (credentials == null) {
      credentials = ComputeEngineCredentials.create();
    }
    return credentials;
  }

  private static ComputeEngineCredentials compute() {
    GoogleCredentials current = credentials();
    if (!(current instanceof ComputeEngineCredentials)) {
      throw new IllegalStateException("ADC gave " + current.getClass().getName());
    }
    return (ComputeEngineCredentials) current;
  }

  private static Map<String, Object> describe(AccessToken token) {
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("token", token.getTokenValue());
    out.put("expiry_ms",
        token.getExpirationTime() == null ? null : token.getExpirationTime().getTime());
    return out;
  }

  private static List<IdTokenProvider.Option> options(String format) {
    switch (format) {
      case "standard":
        return Collections.emptyList();
      case "full":
        return Collections.singletonList(IdTokenProvider.Option.FORMAT_FULL);
      case "full-licenses":
        return Arrays.asList(IdTokenProvider.Option.FORMAT_FULL,
            IdTokenProvider.Option.LICENSES_TRUE);
      default:
        throw new IllegalArgumentException("unknown id token format " + format);
    }
  }

  private static Object idToken(String audience, String format) throws Exception {
    IdTokenCredentials idCredentials = IdTokenCredentials.newBuilder()
        .setIdTokenProvider(compute())
        .setTargetAudience(audience)
        .setOptions(options(format))
        .build();
    idCredentials.refresh();
    IdToken token = idCredentials.getIdToken();
    Map<String, Object> out = describe(token);
    // What a client library would send to a Cloud Run service or IAP with these credentials
    // (an audience need not be a valid URI, so the request goes to a fixed one).
    out.put("authorization", firstAuthorization(idCredentials.getRequestMetadata(
        new URI("https://service.mds-test.example/"))));
    return out;
  }

  private static Object firstAuthorization(Map<String, List<String>> metadata) {
    List<String> values = metadata.get("Authorization");
    return values == null ? metadata : values;
  }

  private static String describeError(Throwable error) {
    StringBuilder text = new StringBuilder();
    for (Throwable cause = error; cause != null; cause = cause.getCause()) {
      if (text.length() > 0) {
        text.append(" <- ");
      }
      text.append(cause.getClass().getName()).append(": ").append(cause.getMessage());
      if (cause.getCause() == cause) {
        break;
      }
    }
    return text.toString();
  }

  public static void main(String[] args) {
    Map<String, Object> report = new LinkedHashMap<>();
    List<String> steps = new ArrayList<>(Arrays.asList(args));
    while (!steps.isEmpty()) {
      String name = steps.remove(0);
      Step step;
      switch (name) {
        case "adc":
          step = () -> {
            credentials = GoogleCredentials.getApplicationDefault();
            return credentials.getClass().getName();
          };
          break;
        case "token":
          step = () -> describe(compute().refreshAccessToken());
          break;
        case "account":
          step = () -> compute().getAccount();
          break;
        case "metadata":
          step = () -> firstAuthorization(
              credentials().getRequestMetadata(new URI("https://storage.googleapis.com")));
          break;
        case "idtoken":
          if (steps.size() < 2) {
            System.err.println("usage: idtoken AUDIENCE FORMAT");
            System.exit(2);
          }
          String audience = steps.remove(0);
          String format = steps.remove(0);
          name = "idtoken/" + format;
          step = () -> idToken(audience, format);
          break;
        default:
          System.err.println("unknown step " + name);
          System.exit(2);
          return;
      }
      Map<String, Object> result = new LinkedHashMap<>();
      try {
        result.put("value", step.run());
      } catch (Exception error) {
        result.put("error", describeError(error));
      }
      report.put(name, result);
    }
    System.out.println(new GsonBuilder().disableHtmlEscaping().serializeNulls().create()
        .toJson(report));
  }
}
