//! Signatures made by the transit RSA key verify offline, with our code and with plain OpenSSL.

use std::process::Command;

use crate::common::*;
use piiguard::crypto::signature::verify;
use piiguard::vault::signer::Signer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transit_pss_signatures_verify_with_openssl_and_offline() {
    let env = TestEnv::start().await;
    // The bootstrap's AppRole (least-privilege policy) may sign: use it as piiguard does.
    let cfg = env.bao.vault_config(piiguard::config::VaultAuth::Approle {
        role_id_file: env.role_id.clone(),
        secret_id_file: env.secret_id.clone(),
        mount: "approle".into(),
    });
    let vault = std::sync::Arc::new(piiguard::vault::Vault::new(cfg).unwrap());
    let signer = Signer::new(vault, piiguard::setup::bootstrap::SIGNING_KEY);
    let msg = b"{\"certificate_id\":\"c-1\"}";
    let sig = signer.sign(msg).await.expect("sign");
    assert_eq!(sig.key_version, 1);
    assert_eq!(sig.bytes.len(), 256, "RSA-2048");
    let keys = signer.public_keys().await.unwrap();
    let pem = &keys.last().unwrap().1;
    verify(pem, msg, &sig.bytes).expect("verifies");
    assert!(verify(pem, b"{\"certificate_id\":\"c-2\"}", &sig.bytes).is_err());
    let mut bad = sig.bytes.clone();
    bad[10] ^= 1;
    assert!(verify(pem, msg, &bad).is_err());

    let d = env.dir.path();
    std::fs::write(d.join("pub.pem"), pem).unwrap();
    std::fs::write(d.join("msg"), msg).unwrap();
    std::fs::write(d.join("sig"), &sig.bytes).unwrap();
    std::fs::write(d.join("msg2"), b"tampered").unwrap();
    let openssl = |m: &str| {
        Command::new("openssl")
            .args(["dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss"])
            .args(["-sigopt", "rsa_pss_saltlen:32", "-verify"])
            .arg(d.join("pub.pem"))
            .arg("-signature")
            .arg(d.join("sig"))
            .arg(d.join(m))
            .output()
            .unwrap()
    };
    let ok = openssl("msg");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("Verified OK"));
    assert!(!openssl("msg2").status.success());
}
