//! The admin API's JSON, fed whatever a client can send (issue 17, fuzzing): every body to
//! every endpoint that reads one is answered, a refusal is a 4xx that says what is wrong,
//! nothing panics, and the node goes on answering. Longer runs: `bench/fuzz.sh`.

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use causeway_cluster::{Node, NodeConfig, NodeStore};
use causeway_mesh::{MemoryNetwork, SystemResolver};
use causeway_store::MemoryStore;
use proptest::prelude::*;
use tower::ServiceExt;

struct Lab {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

/// One single-peer node (its own configuration primary), shared by every case.
fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let router = runtime.block_on(async {
            let net = MemoryNetwork::new();
            let ip = "198.18.0.1".parse().unwrap();
            // A real node file: peer-specific items are written back to it.
            let dir = tempfile::tempdir().unwrap().keep();
            let file = dir.join("node.toml");
            std::fs::write(
                &file,
                format!(
                    "[node]\nsystem_name = \"peer1\"\naddress = \"198.18.0.1\"\ndata_dir = \"{}\"\n\
                     [cluster]\nname = \"cluster.lab.example\"\npeers = [\"198.18.0.1\"]\n\
                     tls_verification = \"Enforce\"\n",
                    dir.display()
                ),
            )
            .unwrap();
            let config = NodeConfig::load(&file).unwrap();
            let store = NodeStore::memory(Arc::new(MemoryStore::new()));
            let resolver = Arc::new(SystemResolver {
                ip_version: Default::default(),
            });
            let (node, _) = Node::start(config, Some(net.transport(ip)), resolver, store);
            causeway_admin::router(node)
        });
        Lab { runtime, router }
    })
}

fn ask(
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let lab = lab();
    let mut request = Request::builder().method(method).uri(path);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let request = request.body(Body::from(body)).unwrap();
    lab.runtime.block_on(async {
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            lab.router.clone().oneshot(request),
        )
        .await
        .expect("answered within 10 s")
        .unwrap();
        let status = answer.status();
        let body = axum::body::to_bytes(answer.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, body.to_vec())
    })
}

const ENDPOINTS: &[&str] = &[
    "/api/v1/configuration",
    "/api/v1/command/setprimary",
    "/api/v1/command/forceconfigupdate",
    "/api/v1/command/resolvepeers",
];

/// A refusal says what is wrong: the API's own JSON `{"error": …}`, or the framework's
/// text for a body that is not the JSON asked for.
fn check(endpoint: &str, status: StatusCode, body: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(
        !status.is_server_error(),
        "{endpoint}: {status} {}",
        String::from_utf8_lossy(body)
    );
    if status.is_client_error() {
        let says = match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => v.get("error").and_then(|e| e.as_str()).map(str::to_string),
            Err(_) => Some(String::from_utf8_lossy(body).to_string()),
        };
        prop_assert!(
            says.is_some_and(|s| !s.trim().is_empty()),
            "{endpoint}: {status} with no reason: {}",
            String::from_utf8_lossy(body)
        );
    }
    // The node still answers.
    let (health, _) = ask("GET", "/api/v1/status/cluster", None, Vec::new());
    prop_assert_eq!(health, StatusCode::OK);
    Ok(())
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,40}".prop_map(serde_json::Value::from),
        // Paths and values the API knows, so deep checks are reached too.
        prop_oneof![
            Just("sip.domains"),
            Just("limits.calls.max"),
            Just("sip.users.alice"),
            Just("cluster.peers"),
            Just("zones.london.address"),
            Just("sip.authentication.policy"),
        ]
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("path".to_string()),
                    Just("value".to_string()),
                    Just("force".to_string()),
                    Just("peer".to_string()),
                    "[a-z]{1,8}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(200)
    ))]

    #[test]
    fn any_bytes_to_any_endpoint_get_an_answer_that_says_what_is_wrong(
        endpoint in prop::sample::select(ENDPOINTS),
        json in any::<bool>(),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let (status, answer) = ask("POST", endpoint, json.then_some("application/json"), body);
        check(endpoint, status, &answer)?;
    }

    #[test]
    fn any_json_to_any_endpoint_gets_an_answer_that_says_what_is_wrong(
        endpoint in prop::sample::select(ENDPOINTS),
        value in json_value(),
    ) {
        let body = serde_json::to_vec(&value).unwrap();
        let (status, answer) = ask("POST", endpoint, Some("application/json"), body);
        check(endpoint, status, &answer)?;
    }
}

#[test]
fn a_body_over_the_limit_is_refused_with_413() {
    let body = format!(
        r#"{{"path":"sip.domains","value":"{}"}}"#,
        "a".repeat(70 * 1024)
    );
    let (status, _) = ask(
        "POST",
        ENDPOINTS[0],
        Some("application/json"),
        body.into_bytes(),
    );
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}
