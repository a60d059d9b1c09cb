//! Compiles proto/ with a vendored protoc, so a fresh machine needs no system package: the
//! services and clients with piiguard's codec; the message types come from `piiguard-client`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY-free: build scripts are single-threaded; this only affects our own process.
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // Edition 2024 marks set_var unsafe because of other threads; build.rs has none.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("piiguard_descriptor.bin"))
        // prost, but a request that does not decode is INVALID_ARGUMENT / MALFORMED_MESSAGE
        // (src/codec.rs), not INTERNAL.
        .codec_path("crate::codec::Codec")
        // The messages and enums are the client crate's (client/build.rs), which also holds the
        // one `skip_debug` list (messages carrying plaintext, tokens or raw subject ids get no
        // derived Debug); here only the services and the clients of this crate's own commands
        // are generated, with the codec above.
        .extern_path(".piiguard.v1", "::piiguard_client::pb")
        .compile_protos(
            &[
                "proto/piiguard/v1/crypto.proto",
                "proto/piiguard/v1/erasure.proto",
                "proto/piiguard/v1/admin.proto",
                "proto/piiguard/v1/tokens.proto",
                "proto/piiguard/v1/keys.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
