//! The HTTP Contract against one real node: limits, bad input, errors, OpenAPI, metrics;
//! and the CLI on a closed output pipe.

mod harness;

use capkv_client::{Consistency, ErrorCode, KeyspaceSpec, Mode, WriteOptions};
use harness::Cluster;

async fn call(method: reqwest::Method, url: String, body: Vec<u8>) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .request(method, url)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

fn code(v: &serde_json::Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no error code>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    use reqwest::Method;
    let c = Cluster::start(1, &["--max-value-bytes", "1000"]).await;
    let u = c.url(0);

    let (s, b) = call(Method::PUT, format!("{u}/v1/kv/cp/k"), vec![b'x'; 1001]).await;
    assert_eq!((s, code(&b)), (413, "too_large"), "{b}");
    let (s, _) = call(Method::PUT, format!("{u}/v1/kv/cp/k"), vec![b'x'; 1000]).await;
    assert_eq!(s, 200);

    // A CAS value is bounded like a value (it is carried in the log entry).
    let big = "x".repeat(1001);
    let (s, b) = call(
        Method::PUT,
        format!("{u}/v1/kv/cp/k?if_value={big}"),
        b"v".to_vec(),
    )
    .await;
    assert_eq!((s, code(&b)), (413, "too_large"), "{b}");

    let long_key = "k".repeat(1025);
    let (s, b) = call(
        Method::PUT,
        format!("{u}/v1/kv/cp/{long_key}"),
        b"v".to_vec(),
    )
    .await;
    assert_eq!((s, code(&b)), (413, "too_large"));
    let ok_key = "k".repeat(1024);
    let (s, _) = call(Method::PUT, format!("{u}/v1/kv/cp/{ok_key}"), b"v".to_vec()).await;
    assert_eq!(s, 200);

    for (method, path, body) in [
        (Method::PUT, "/v1/kv/cp/k?if_verison=1", b"v".to_vec()),
        (Method::PUT, "/v1/kv/cp/k?if_version=abc", b"v".to_vec()),
        (
            Method::PUT,
            "/v1/kv/cp/k?if_version=1&if_value=x",
            b"v".to_vec(),
        ),
        (Method::PUT, "/v1/kv/cp/k?timeout_ms=0", b"v".to_vec()),
        (Method::GET, "/v1/kv/cp/k?consistency=eventual", vec![]),
        (Method::GET, "/v1/kv/cp?limit=0", vec![]),
        (Method::GET, "/v1/kv/bad%20name/k", vec![]),
        (Method::GET, "/v1/kv/cp/%FF", vec![]),
        (Method::POST, "/v1/keyspaces", b"{not json".to_vec()),
        (
            Method::POST,
            "/v1/keyspaces",
            br#"{"name":"x","mode":"ca"}"#.to_vec(),
        ),
        (
            Method::POST,
            "/v1/keyspaces",
            br#"{"name":"x","mode":"cp","n":3}"#.to_vec(),
        ),
        // More replicas than the (one-node) cluster has nodes (#8 item 16).
        (
            Method::POST,
            "/v1/keyspaces",
            br#"{"name":"x","mode":"ap","n":2}"#.to_vec(),
        ),
    ] {
        let (s, b) = call(method.clone(), format!("{u}{path}"), body).await;
        assert_eq!((s, code(&b)), (400, "bad_request"), "{method} {path}: {b}");
        assert!(b["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }

    // The default n (3) shrinks to the cluster.
    let (s, b) = call(
        Method::POST,
        format!("{u}/v1/keyspaces"),
        br#"{"name":"small","mode":"ap"}"#.to_vec(),
    )
    .await;
    assert_eq!((s, b["n"].as_u64()), (201, Some(1)), "{b}");

    let (s, b) = call(Method::GET, format!("{u}/v1/kv/nosuch/k"), vec![]).await;
    assert_eq!((s, code(&b)), (404, "not_found"));
    let (s, b) = call(Method::PUT, format!("{u}/v1/kv/nosuch/k"), b"v".to_vec()).await;
    assert_eq!((s, code(&b)), (404, "not_found"));
    let (s, b) = call(Method::GET, format!("{u}/v1/nothing-here"), vec![]).await;
    assert_eq!((s, code(&b)), (404, "not_found"));
    let (s, b) = call(
        Method::POST,
        format!("{u}/v1/keyspaces"),
        br#"{"name":"cp","mode":"cp"}"#.to_vec(),
    )
    .await;
    assert_eq!((s, code(&b)), (409, "conflict"));

    // Faults are refused unless the node runs with --enable-faults.
    let plain = Cluster::start_with(1, &[], false).await;
    let (s, b) = call(
        Method::POST,
        format!("{}/v1/faults", plain.url(0)),
        br#"{"isolate_from":[]}"#.to_vec(),
    )
    .await;
    assert_eq!((s, code(&b)), (403, "forbidden"));
    let (s, b) = call(
        Method::POST,
        format!("{u}/v1/faults"),
        br#"{"isolate_from":["n9"]}"#.to_vec(),
    )
    .await;
    assert_eq!((s, code(&b)), (400, "bad_request"), "{b}");

    // The node is still fine after all of that.
    let client = c.client(0);
    client
        .put("cp", b"after", b"ok".to_vec(), &WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(
        client
            .get("cp", b"after", Consistency::Linearizable)
            .await
            .unwrap()
            .unwrap()
            .value,
        b"ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_delete_and_scan_semantics() {
    let c = Cluster::start(1, &[]).await;
    let client = c.client(0);
    let none = WriteOptions::default();
    let v1 = client
        .put(
            "cp",
            b"a",
            b"1".to_vec(),
            &WriteOptions {
                if_version: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let err = client
        .put(
            "cp",
            b"a",
            b"2".to_vec(),
            &WriteOptions {
                if_version: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict));
    let v2 = client
        .put(
            "cp",
            b"a",
            b"2".to_vec(),
            &WriteOptions {
                if_version: Some(v1.version),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(v2.version > v1.version);
    let err = client
        .put(
            "cp",
            b"a",
            b"3".to_vec(),
            &WriteOptions {
                if_value: Some("1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict));
    client
        .put(
            "cp",
            b"a",
            b"3".to_vec(),
            &WriteOptions {
                if_value: Some("2".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let d = client.delete("cp", b"a", &none).await.unwrap();
    assert!(d.deleted);
    assert!(client
        .get("cp", b"a", Consistency::Linearizable)
        .await
        .unwrap()
        .is_none());
    assert!(!client.delete("cp", b"a", &none).await.unwrap().deleted);

    for k in ["p/1", "p/2", "p/3", "q/1"] {
        client
            .put("cp", k.as_bytes(), k.as_bytes().to_vec(), &none)
            .await
            .unwrap();
    }
    let (page1, more) = client.scan("cp", "p/", None, Some(2)).await.unwrap();
    assert!(more);
    let last = page1.last().unwrap().key.clone().unwrap();
    let (page2, more) = client.scan("cp", "p/", Some(&last), Some(2)).await.unwrap();
    assert!(!more);
    let keys: Vec<String> = page1
        .iter()
        .chain(&page2)
        .map(|e| e.key.clone().unwrap())
        .collect();
    assert_eq!(keys, vec!["p/1", "p/2", "p/3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_metrics_and_group_commit() {
    let c = Cluster::start(1, &[]).await;
    let u = c.url(0);
    let spec: serde_json::Value = reqwest::get(format!("{u}/v1/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["openapi"].is_string());
    for path in [
        "/v1/kv/{ks}/{key}",
        "/v1/kv/{ks}",
        "/v1/keyspaces",
        "/v1/cluster",
        "/v1/faults",
    ] {
        assert!(spec["paths"][path].is_object(), "openapi lacks {path}");
    }

    // 64 concurrent writers: group commit makes them share fsyncs.
    let m = c.metrics(0).await;
    let before = harness::metric(&m, "capkv_storage_fsyncs_total");
    let before_waiters = harness::metric(&m, "capkv_storage_synced_waiters_total");
    let mut tasks = Vec::new();
    for w in 0..64 {
        let client = c.client(0);
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                client
                    .put(
                        "cp",
                        format!("g{w}-{i}").as_bytes(),
                        b"v".to_vec(),
                        &WriteOptions::default(),
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m = c.metrics(0).await;
    let fsyncs = harness::metric(&m, "capkv_storage_fsyncs_total") - before;
    let waiters = harness::metric(&m, "capkv_storage_synced_waiters_total") - before_waiters;
    eprintln!("group commit: 640 writes, {fsyncs} fsyncs for {waiters} waiters");
    assert!(fsyncs > 0.0);
    assert!(
        fsyncs < 640.0,
        "640 writes should share fsyncs, took {fsyncs}"
    );
    for name in [
        "capkv_http_requests_total",
        "capkv_http_request_duration_seconds_bucket",
        "capkv_raft_term",
        "capkv_raft_applied_index",
        "capkv_raft_commit_index",
        "capkv_raft_leader_changes_total",
    ] {
        assert!(m.contains(name), "metrics lack {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_ends_quietly_when_its_output_pipe_closes() {
    let c = Cluster::start(1, &[]).await;
    let url = c.url(0);
    let stderr = tokio::task::block_in_place(|| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_capkv"))
            .args(["status", "--node", &url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running capkv status");
        // Like `capkv status | head -0`: the reader is gone before anything is printed.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("waiting for capkv status");
        String::from_utf8_lossy(&out.stderr).into_owned()
    });
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Found by review: `capkv put/get/del` on an ap keyspace (the one `capkv dev` creates)
/// failed with "error decoding response body": the CLI spoke cp to it. It now asks the
/// keyspace's mode and uses the ap API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_and_writes_ap_keyspaces() {
    let c = Cluster::start(1, &[]).await;
    c.client(0)
        .create_keyspace(&KeyspaceSpec::new("cart", Mode::Ap))
        .await
        .unwrap();
    let url = c.url(0);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_capkv"))
            .args(args)
            .args(["--node", &url])
            .output()
            .expect("running capkv");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    tokio::task::block_in_place(|| {
        let (ok, out, err) = run(&["put", "cart", "k", "book"]);
        assert!(ok, "{out}{err}");
        let (ok, out, err) = run(&["get", "cart", "k"]);
        assert!(ok, "{out}{err}");
        assert_eq!(out.trim(), "book");
        // A second put replaces the value (it writes with the context it read).
        let (ok, out, err) = run(&["put", "cart", "k", "lamp"]);
        assert!(ok, "{out}{err}");
        let (_, out, _) = run(&["get", "cart", "k"]);
        assert_eq!(out.trim(), "lamp");
        let (ok, _, err) = run(&["put", "cart", "k", "x", "--if-version", "1"]);
        assert!(!ok && err.contains("cp keyspaces"), "{err}");
        let (ok, out, err) = run(&["del", "cart", "k"]);
        assert!(ok, "{out}{err}");
        let (ok, _, err) = run(&["get", "cart", "k"]);
        assert!(!ok && err.contains("not found"), "{err}");
        // cp keyspaces as before.
        let (ok, out, err) = run(&["put", "cp", "k", "v"]);
        assert!(ok && out.contains("version"), "{out}{err}");
    });
}
