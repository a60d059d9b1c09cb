//! Compiles the repository's `proto/` (client stubs only) with a vendored protoc. The server
//! crate takes its message types from here (`extern_path`), so this file holds the one list of
//! messages that get no derived `Debug`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // Edition 2024 marks set_var unsafe because of other threads; build.rs has none.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let proto = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files: Vec<_> = ["crypto", "erasure", "admin", "tokens", "keys"]
        .iter()
        .map(|f| proto.join(format!("piiguard/v1/{f}.proto")))
        .collect();
    tonic_prost_build::configure()
        .build_server(false)
        // Messages that carry plaintext, values, tokens or raw subject ids get no derived Debug:
        // a stray `{:?}` in a calling service or in the server cannot leak PII.
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
        .compile_protos(&files, std::slice::from_ref(&proto))?;
    println!("cargo:rerun-if-changed={}", proto.display());
    Ok(())
}
