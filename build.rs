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
        // prost, but a request that does not decode is INVALID_ARGUMENT / MALFORMED_MESSAGE
        // (src/codec.rs), not INTERNAL.
        .codec_path("crate::codec::Codec")
        // Messages that carry plaintext get no derived Debug: a stray `{:?}` cannot leak PII.
        .skip_debug([
            ".piiguard.v1.EncryptRequest",
            ".piiguard.v1.DecryptResponse",
            ".piiguard.v1.DecryptResult",
            ".piiguard.v1.EncryptBatchRequest",
            ".piiguard.v1.DecryptBatchResponse",
            ".piiguard.v1.CreateCanaryRequest",
            // Tokens: values and tokens alike are never Debug-printed.
            ".piiguard.v1.TokenizeRequest",
            ".piiguard.v1.TokenizeResponse",
            ".piiguard.v1.TokenizeResult",
            ".piiguard.v1.TokenizeBatchRequest",
            ".piiguard.v1.TokenizeBatchResponse",
            ".piiguard.v1.DetokenizeRequest",
            ".piiguard.v1.DetokenizeResponse",
            ".piiguard.v1.DetokenizeResult",
            ".piiguard.v1.DetokenizeBatchRequest",
            ".piiguard.v1.DetokenizeBatchResponse",
            // Erasure requests carry raw subject ids (personal data): no Debug either.
            ".piiguard.v1.ShredRequest",
            ".piiguard.v1.GetShredStatusRequest",
            ".piiguard.v1.CancelShredRequest",
            ".piiguard.v1.SetRetentionRequest",
            // Sealed envelopes carry PII for a subject; blind-index requests carry values.
            ".piiguard.v1.UnsealRequest",
            ".piiguard.v1.UnsealResponse",
            ".piiguard.v1.UnsealResult",
            ".piiguard.v1.UnsealBatchRequest",
            ".piiguard.v1.UnsealBatchResponse",
            ".piiguard.v1.BlindIndexRequest",
            ".piiguard.v1.BlindIndexBatchRequest",
            ".piiguard.v1.RotateSubjectKeyRequest",
        ])
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
