//! How refusals reach clients: a gRPC code chosen by the reason, a message for people, and `google.rpc` details
//! for programs (`ErrorInfo` with the reason, `BadRequest` naming the field).

use std::collections::HashMap;

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{ERROR_DOMAIN, QueueError, Reason, Refusal};
use crate::store::StoreError;

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Self {
        let mut details = ErrorDetails::new();
        let metadata: HashMap<String, String> = refusal
            .job_id
            .iter()
            .map(|id| ("job_id".to_owned(), id.clone()))
            .collect();
        details.set_error_info(refusal.reason.as_str(), ERROR_DOMAIN, metadata);
        if let Some(field) = &refusal.field {
            details.add_bad_request_violation(field, &refusal.message);
        }
        Status::with_error_details(refusal.reason.code(), refusal.message, details)
    }
}

impl From<QueueError> for Status {
    fn from(error: QueueError) -> Self {
        let refusal = match error {
            QueueError::Refused(refusal) => refusal,
            QueueError::Store(StoreError::Unavailable(cause)) => {
                tracing::warn!(%cause, "database unavailable");
                Refusal::new(
                    Reason::DatabaseUnavailable,
                    "the database is unavailable right now; try again shortly",
                )
            }
            QueueError::Store(StoreError::Full(cause)) => {
                tracing::error!(%cause, "database full");
                Refusal::new(
                    Reason::DiskFull,
                    "the server's disk is full; free space and try again",
                )
            }
            QueueError::Store(StoreError::Broken(reason)) => {
                tracing::error!(%reason, "database broken");
                Refusal::new(
                    Reason::DatabaseBroken,
                    format!("the server cannot use its database: {reason}"),
                )
            }
            QueueError::Store(StoreError::Internal(cause)) => {
                tracing::error!(%cause, "database error");
                Refusal::new(
                    Reason::Internal,
                    "internal error; the server log has the details",
                )
            }
        };
        refusal.into()
    }
}

/// The transport's own refusals of a request, with the codes and details every other refusal has: tonic answers
/// a request that does not decode with INTERNAL (as if the server were at fault) and one over the size limit with
/// OUT_OF_RANGE. Both come before any handler runs, as a response of headers only, which is where they are read.
pub fn transport_refusals<B: Default>(
    response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let refusal = match status.code() {
        tonic::Code::Internal => match status
            .message()
            .strip_prefix("failed to decode Protobuf message")
        {
            Some(cause) => Refusal::new(
                Reason::MalformedRequest,
                format!("the request is not a valid message of its type{cause}",),
            ),
            None => return response,
        },
        tonic::Code::OutOfRange => match status
            .message()
            .strip_prefix("Error, decoded message length too large: ")
        {
            Some(sizes) => Refusal::new(
                Reason::RequestTooLarge,
                format!("the request is too large ({sizes})"),
            ),
            None => return response,
        },
        _ => return response,
    };
    Status::from(refusal).into_http()
}
