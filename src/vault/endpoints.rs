//! The Vault endpoints piiguard needs that vaultrs 0.8 does not have, as rustify `Endpoint`s
//! executed through vaultrs' own `exec_with_result` (or, for [`Raw`], rustify's `exec` with
//! vaultrs' middleware): same HTTP client, same token header, same error type.
//!
//! - [`SignPss`]: transit sign with `salt_length` (vaultrs' `SignDataRequest` has no such
//!   field; without it Vault picks the maximum salt length, which `openssl dgst -sigopt
//!   rsa_pss_saltlen:32` does not verify).
//! - [`Raw`]: any method on any path with an explicit token, answering status and JSON body
//!   whatever the status (bootstrap and dev setup read Vault's error texts, e.g. "already
//!   exists").
//!
//! Transit RSA decrypt with `batch_input` (sealed envelopes, `Vault::transit_rsa_decrypt`),
//! key read, rotate and config go through [`Raw`] with the service's token, as does the KEK
//! rewrap job's batch transit `rewrap` ([`super::kek`]); cold DEKs are still unwrapped one by
//! one, single-flight per key. `piiguard-bench` also sends `batch_input`, straight to OpenBao,
//! to measure OpenBao itself.

use rustify::endpoint::Endpoint;
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use rustify::errors::ClientError as RestError;
use serde::{Deserialize, Serialize};

/// `POST {mount}/sign/{name}`: RSA-PSS with SHA-256 and salt length = hash length.
#[derive(Serialize)]
pub struct SignPss<'a> {
    /// The transit mount.
    #[serde(skip)]
    pub mount: &'a str,
    /// The transit key.
    #[serde(skip)]
    pub name: &'a str,
    /// The message, base64.
    pub input: String,
    /// Always `sha2-256`.
    pub hash_algorithm: &'static str,
    /// Always `pss`.
    pub signature_algorithm: &'static str,
    /// Always `hash` (32 bytes for SHA-256): what vaultrs cannot send.
    pub salt_length: &'static str,
}

impl<'a> SignPss<'a> {
    /// A request to sign `input_b64` with transit key `name` of `mount`.
    pub fn new(mount: &'a str, name: &'a str, input_b64: String) -> Self {
        Self {
            mount,
            name,
            input: input_b64,
            hash_algorithm: "sha2-256",
            signature_algorithm: "pss",
            salt_length: "hash",
        }
    }
}

/// The `data` of a transit sign response.
#[derive(Deserialize)]
pub struct SignResponse {
    /// `vault:v<N>:<base64 signature>`.
    pub signature: String,
}

fn json_body(v: &impl Serialize) -> Result<Option<Vec<u8>>, RestError> {
    serde_json::to_vec(v)
        .map(Some)
        .map_err(|e| RestError::DataParseError { source: e.into() })
}

impl Endpoint for SignPss<'_> {
    type Response = SignResponse;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        format!("{}/sign/{}", self.mount, self.name)
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::POST
    }

    fn body(&self) -> Result<Option<Vec<u8>>, RestError> {
        json_body(self)
    }
}

/// Any request: `method` on `path` (relative to `/v1/`) with an optional JSON body.
pub struct Raw<'a> {
    /// The HTTP method (Vault's `LIST` included).
    pub method: RequestMethod,
    /// The API path after `/v1/`.
    pub path: &'a str,
    /// The JSON body, if any.
    pub body: Option<&'a serde_json::Value>,
}

impl Endpoint for Raw<'_> {
    type Response = serde_json::Value;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        self.path.to_string()
    }

    fn method(&self) -> RequestMethod {
        self.method.clone()
    }

    fn body(&self) -> Result<Option<Vec<u8>>, RestError> {
        match self.body {
            Some(v) => json_body(v),
            None => Ok(None),
        }
    }
}

/// The rustify method of an HTTP method; `None` for one Vault has no use for.
pub fn request_method(m: &reqwest::Method) -> Option<RequestMethod> {
    Some(match m.as_str() {
        "GET" => RequestMethod::GET,
        "POST" => RequestMethod::POST,
        "PUT" => RequestMethod::PUT,
        "PATCH" => RequestMethod::PATCH,
        "DELETE" => RequestMethod::DELETE,
        "HEAD" => RequestMethod::HEAD,
        "LIST" => RequestMethod::LIST,
        _ => return None,
    })
}
