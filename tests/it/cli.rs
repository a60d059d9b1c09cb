//! Client commands (`admin`, `shred`) over the one mTLS client: the same connection flags,
//! dev defaults, and a clear message when the CA is wrong.

use std::process::{Command, Output};

use piiguard::setup::pki::Ca;

use crate::common::*;

fn piiguard(cwd: &std::path::Path, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_share_one_mtls_connection_and_explain_a_wrong_ca() {
    let env = TestEnv::start().await;
    let server = env.server("cli", "").await;
    let endpoint = server.addr.to_string();
    let work = tempfile::tempdir().unwrap();

    // admin with explicit files.
    let (cert, key) = env.pki.client("admin");
    let conn = |ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path| {
        vec![
            "--endpoint".into(),
            endpoint.clone(),
            "--ca".into(),
            s(ca),
            "--cert".into(),
            s(cert),
            "--key".into(),
            s(key),
        ]
    };
    let mut args = vec!["admin".to_string()];
    args.extend(conn(&env.pki.ca, &cert, &key));
    args.push("signing-keys".into());
    let o = piiguard(work.path(), &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("BEGIN PUBLIC KEY"), "{out}");

    // admin with the dev defaults (certs/dev/ca.pem, client-admin.pem/.key), and the old
    // `--address` spelling.
    std::fs::create_dir_all(work.path().join("certs")).unwrap();
    std::os::unix::fs::symlink(&env.pki.dir, work.path().join("certs/dev")).unwrap();
    let o = piiguard(
        work.path(),
        &[
            "admin".into(),
            "--address".into(),
            endpoint.clone(),
            "lockouts".into(),
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("no lockouts"), "{out}");

    // shred with the same flags (and the dev default erasure identity).
    let subjects = work.path().join("subjects.txt");
    std::fs::write(&subjects, "cust-cli-1,orders\n").unwrap();
    let shred = |extra: Vec<String>| {
        let mut a = vec!["shred".to_string(), "--file".into(), s(&subjects)];
        a.extend(extra);
        piiguard(work.path(), &a)
    };
    let o = shred(vec!["--endpoint".into(), endpoint.clone()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains("1 requests"), "{err}");

    // A CA that did not issue the server certificate: a clear refusal, no key material.
    let (other, _) = Ca::generate().unwrap();
    let other_ca = work.path().join("other-ca.pem");
    std::fs::write(&other_ca, &other.cert_pem).unwrap();
    let mut args = vec!["admin".to_string()];
    args.extend(conn(&other_ca, &cert, &key));
    args.push("signing-keys".into());
    let (ecert, ekey) = env.pki.client("erasure");
    for o in [
        piiguard(work.path(), &args),
        shred(conn(&other_ca, &ecert, &ekey)),
    ] {
        let (out, err) = text(&o);
        assert!(!o.status.success(), "{out}{err}");
        assert!(
            err.contains(&format!("cannot connect to {endpoint}"))
                && err.contains("not issued by the CA given with --ca"),
            "{err}"
        );
        assert!(!err.contains("PRIVATE KEY") && !out.contains("PRIVATE KEY"));
    }

    // A missing key file is named.
    let missing = work.path().join("nope.key");
    let mut args = vec!["admin".to_string()];
    args.extend(conn(&env.pki.ca, &cert, &missing));
    args.push("lockouts".into());
    let o = piiguard(work.path(), &args);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("client key") && err.contains(&s(&missing)),
        "{err}"
    );
}
