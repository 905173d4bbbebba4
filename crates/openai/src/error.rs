//! Errors in OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`),
//! with the HTTP status its clients act on. A gRPC status maps here once.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tonic::Code;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    /// `retry-after` of a 429, seconds (the server's hint; else 1).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            retry_after_s: None,
        }
    }

    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            retry_after_s: None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => "service_unavailable",
            _ => "server_error",
        }
    }

    /// The error object, for a response body or an SSE event.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.status.as_u16(),
            }
        })
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> ApiError {
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            // The client that cancels never reads the answer: a cancellation that reaches
            // one came from a server on the way (a prefill-server's call cut off).
            Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut e = ApiError::new(status, s.message().to_string());
        e.retry_after_s = s
            .metadata()
            .get(daemon::metrics::RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map(|ms| ms.div_ceil(1000).max(1));
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            let secs = self.retry_after_s.unwrap_or(1);
            r.headers_mut().insert("retry-after", axum::http::HeaderValue::from(secs));
        }
        r
    }
}
