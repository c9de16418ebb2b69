//! JSON-RPC 2.0 framing for the control socket: one JSON object per line each way.
//!
//! Errors carry a JSON-RPC code and a stable `data.kind` string that scripts and the C
//! library can match on; messages are for humans and may change.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// JSON-RPC: the line was not valid JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC: not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC: no such method.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC: bad parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// Implementation-defined: the request was valid but could not be carried out.
pub const SERVER_ERROR: i64 = -32000;

/// A request as received.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Must be "2.0".
    pub jsonrpc: String,
    /// Echoed in the response; absent for notifications (which we still answer).
    #[serde(default)]
    pub id: Value,
    /// Method name, e.g. `device.add`.
    pub method: String,
    /// Named parameters.
    #[serde(default)]
    pub params: Value,
}

/// A response line.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// Always "2.0".
    pub jsonrpc: String,
    /// The request's id (null when it could not be read).
    pub id: Value,
    /// The result, on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RpcError {
    /// JSON-RPC error code.
    pub code: i64,
    /// Human-readable message.
    pub message: String,
    /// `{"kind": "..."}`: the stable, machine-readable error kind.
    pub data: ErrorData,
}

/// Machine-readable error details.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorData {
    /// Stable kind: `parse`, `invalid-request`, `unknown-method`, `invalid-params`,
    /// `not-found`, `exists`, `busy`, `io`, `too-large`, `unauthorized`.
    pub kind: String,
}

impl RpcError {
    /// An error with `code`, `kind` and `message`.
    pub fn new(code: i64, kind: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: ErrorData {
                kind: kind.to_string(),
            },
        }
    }

    /// Bad parameters.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, "invalid-params", message)
    }
}

impl Response {
    /// A success response.
    pub fn ok(id: Value, result: Value) -> Self {
        Self {
            jsonrpc: "2.0".into(),
            id,
            result: Some(result),
            error: None,
        }
    }

    /// An error response.
    pub fn err(id: Value, error: RpcError) -> Self {
        Self {
            jsonrpc: "2.0".into(),
            id,
            result: None,
            error: Some(error),
        }
    }
}

/// Parses one request line; a failure is already the response to send.
pub fn parse_request(line: &[u8]) -> Result<Request, Box<Response>> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        Box::new(Response::err(
            Value::Null,
            RpcError::new(PARSE_ERROR, "parse", format!("not JSON: {e}")),
        ))
    })?;
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    let request: Request = serde_json::from_value(value).map_err(|e| {
        Box::new(Response::err(
            id.clone(),
            RpcError::new(
                INVALID_REQUEST,
                "invalid-request",
                format!("bad request: {e}"),
            ),
        ))
    })?;
    if request.jsonrpc != "2.0" {
        return Err(Box::new(Response::err(
            id,
            RpcError::new(
                INVALID_REQUEST,
                "invalid-request",
                "jsonrpc must be \"2.0\"",
            ),
        )));
    }
    Ok(request)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let r = parse_request(br#"{"jsonrpc":"2.0","id":7,"method":"device.list"}"#).unwrap();
        assert_eq!(r.method, "device.list");
        assert_eq!(r.id, serde_json::json!(7));
        let e = parse_request(b"{nope").unwrap_err();
        assert_eq!(e.error.unwrap().data.kind, "parse");
        let e = parse_request(br#"{"jsonrpc":"1.0","id":1,"method":"x"}"#).unwrap_err();
        assert_eq!(e.id, serde_json::json!(1));
        assert_eq!(e.error.unwrap().code, INVALID_REQUEST);
        let e = parse_request(br#"{"jsonrpc":"2.0","id":1,"method":"x","extra":1}"#).unwrap_err();
        assert_eq!(e.error.unwrap().data.kind, "invalid-request");
    }
}
