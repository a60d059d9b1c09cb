//! A tour against `piiguard dev` (its defaults: 127.0.0.1:7443, the dev PKI in certs/dev):
//! encrypt with a blind index, look the row up by its index, decrypt, tokenise and
//! detokenise, shred as the deletion workflow, and see the shredded data refused for good.
//!
//! ```text
//! cargo run --release -- dev          # in one terminal, at the repository root
//! cargo run -p piiguard-client --example tour [-- ENDPOINT PKI_DIR]
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use piiguard_client::{Client, ClientConfig, Error, Reason, pb};

fn config(endpoint: &str, pki: &std::path::Path, who: &str) -> ClientConfig {
    ClientConfig::from_files(
        endpoint,
        pki.join("ca.pem"),
        pki.join(format!("client-{who}.pem")),
        pki.join(format!("client-{who}.key")),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(|| "127.0.0.1:7443".into());
    let pki = PathBuf::from(args.next().unwrap_or_else(|| "certs/dev".into()));
    // The order service and the deletion workflow are two identities, two clients.
    let orders = Client::connect(config(&endpoint, &pki, "orders")).await?;
    let erasure = Client::connect(config(&endpoint, &pki, "erasure")).await?;
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default();
    let subject = format!("cust-{run}");

    // The calling service's table: row id -> (email ciphertext, email blind index).
    let mut table: HashMap<u32, (Vec<u8>, String)> = HashMap::new();
    for (id, email) in [(1, "alice@example.com"), (2, "bob@example.com")] {
        let r = orders
            .encrypt_with(pb::EncryptRequest {
                keyspace: "orders".into(),
                subject: format!("{subject}-{id}"),
                field: "email".into(),
                plaintext: email.as_bytes().to_vec(),
                encoding: pb::CiphertextEncoding::Text as i32,
                blind_index: true,
                ..Default::default()
            })
            .await?;
        table.insert(id, (r.ciphertext, r.blind_index));
    }
    println!("encrypted {} emails, each with a blind index", table.len());

    // Search by value: the indexes of every queryable key version; no plaintext in the table.
    let wanted = orders
        .blind_indexes("orders", "email", b"  Alice@Example.com ")
        .await?;
    let (&id, (ct, _)) = table
        .iter()
        .find(|(_, (_, ix))| wanted.contains(ix))
        .expect("the row of alice@example.com");
    let email = orders.decrypt("email", ct).await?;
    println!(
        "blind-index lookup found row {id}: {}",
        String::from_utf8_lossy(&email)
    );

    let token = orders
        .tokenize(
            "orders",
            &format!("{subject}-2"),
            "email",
            "bob@example.com",
            pb::TokenMode::Random,
        )
        .await?;
    let value = orders.detokenize("orders", &token).await?;
    assert_eq!(value.as_str(), "bob@example.com");
    println!("tokenize / detokenize: ok");

    let r = erasure
        .shred(
            &format!("{subject}-1"),
            "orders",
            &format!("gdpr-{run}"),
            "erasure request",
        )
        .await?;
    println!("shred: {} keyspace(s) answered", r.keyspaces.len());
    match orders.decrypt("email", ct).await {
        Err(e @ Error::Rpc { .. }) if e.reason() == Some(&Reason::SubjectShredded) => {
            println!(
                "decrypt after shred: {} (final, not retried: {} attempt)",
                Reason::SubjectShredded,
                e.attempts()
            );
        }
        Err(e) => return Err(e),
        Ok(_) => panic!("a shredded subject's ciphertext still decrypts"),
    }
    Ok(())
}
