//! Compiles proto/ with a vendored protoc, so a fresh machine needs no system package.

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
        // Messages that carry plaintext get no derived Debug: a stray `{:?}` cannot leak PII.
        .skip_debug([
            ".piiguard.v1.EncryptRequest",
            ".piiguard.v1.DecryptResponse",
            ".piiguard.v1.DecryptResult",
            ".piiguard.v1.EncryptBatchRequest",
            ".piiguard.v1.DecryptBatchResponse",
            ".piiguard.v1.CreateCanaryRequest",
        ])
        .compile_protos(
            &[
                "proto/piiguard/v1/crypto.proto",
                "proto/piiguard/v1/erasure.proto",
                "proto/piiguard/v1/admin.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
