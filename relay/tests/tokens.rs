//! Public-key tokens: keys from `ptt-relay keygen`, tokens from
//! `ptt-relay token --private-key`, a relay checking them against a JWKS it
//! re-reads (rotation without a restart).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use codec::ErrorCode;
use common::*;
use ptt_client::{ClientError, ClientOptions};

fn ptt_relay(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ptt-relay"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ptt-relay {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn keygen(dir: &Path, alg: &str, kid: &str, jwks: &Path) -> std::path::PathBuf {
    let pk = dir.join(format!("{kid}.pem"));
    ptt_relay(&[
        "keygen",
        "--alg",
        alg,
        "--kid",
        kid,
        "--private-key",
        pk.to_str().unwrap(),
        "--jwks",
        jwks.to_str().unwrap(),
    ]);
    pk
}

fn mint(pk: &Path, kid: &str, user: &str) -> String {
    ptt_relay(&[
        "token",
        "--private-key",
        pk.to_str().unwrap(),
        "--kid",
        kid,
        "--user",
        user,
        "--channel",
        "ops",
    ])
}

async fn refused(t: &TestRelay, token: &str) -> ErrorCode {
    match t.try_connect_with(token, ClientOptions::default()).await {
        Err(ClientError::Closed { code, .. }) => code,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("token accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_tokens_rotate_without_a_restart() {
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path();
    let jwks = k.join("jwks.json");
    let ed1 = keygen(k, "ed25519", "ed-1", &jwks);
    let es1 = keygen(k, "es256", "es-1", &jwks);
    let t = start(|c| {
        c.token_keys = jwks.display().to_string();
        c.token_keys_reload = Duration::from_millis(100);
        c.token_hs256 = false;
    })
    .await;
    // Both algorithms sign in, with the channel grant of their token.
    for (pk, kid, user) in [(&ed1, "ed-1", "alice"), (&es1, "es-1", "bob")] {
        let (c, _) = t
            .try_connect_with(&mint(pk, kid, user), ClientOptions::default())
            .await
            .unwrap();
        assert_eq!(c.user(), user);
    }
    // HS256 is off on this relay.
    assert_eq!(
        refused(&t, &t.token("carol")).await,
        ErrorCode::TokenInvalid
    );
    // A kid the relay does not know.
    assert_eq!(
        refused(&t, &mint(&ed1, "nobody", "carol")).await,
        ErrorCode::TokenInvalid
    );
    // Rotation: ed-2 added, then ed-1 retired, while the relay runs.
    let ed2 = keygen(k, "ed25519", "ed-2", &jwks);
    let old = mint(&ed1, "ed-1", "dave");
    let new = mint(&ed2, "ed-2", "erin");
    wait_until(|| t.relay.shared().public_keys().len() == 3).await;
    t.try_connect_with(&new, ClientOptions::default())
        .await
        .unwrap();
    retire(&jwks, "ed-1");
    wait_until(|| t.relay.shared().public_keys().len() == 2).await;
    assert_eq!(
        refused(&t, &old).await,
        ErrorCode::TokenInvalid,
        "retired key"
    );
    t.try_connect_with(&new, ClientOptions::default())
        .await
        .unwrap();
    // A broken file keeps the keys the relay had.
    std::fs::write(&jwks, "{ not json").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(t.relay.shared().public_keys().len(), 2);
    t.try_connect_with(&mint(&es1, "es-1", "fred"), ClientOptions::default())
        .await
        .unwrap();
}

fn retire(jwks: &Path, kid: &str) {
    let mut set: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(jwks).unwrap()).unwrap();
    set["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["kid"] != kid);
    let tmp = jwks.with_extension("tmp");
    std::fs::write(&tmp, set.to_string()).unwrap();
    std::fs::rename(tmp, jwks).unwrap();
}

async fn wait_until(f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reloaded in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `keygen` never overwrites a private key or repeats a kid.
#[test]
fn keygen_refuses_to_overwrite() {
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path();
    let jwks = k.join("jwks.json");
    keygen(k, "ed25519", "a", &jwks);
    for args in [
        // Same kid again.
        vec!["--kid", "a", "--private-key", "b.pem"],
        // Existing private key file.
        vec!["--kid", "b", "--private-key", "a.pem"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ptt-relay"))
            .current_dir(k)
            .arg("keygen")
            .args(&args)
            .args(["--jwks", jwks.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
    }
    let set: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&jwks).unwrap()).unwrap();
    assert_eq!(set["keys"].as_array().unwrap().len(), 1);
}
