//! Unknown query parameters are refused (400 naming the parameter), as unknown body fields are:
//! a misspelt filter (`?pipelineid=3`) must not silently list everything. What each operation
//! accepts is read from the OpenAPI document the router is built from, so the check and the
//! documentation cannot drift apart.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{OpenApi, RefOr};

use crate::api_error::ApiError;

/// The query parameters of every operation, by method and path template.
#[derive(Debug, Default)]
pub struct QueryParameters {
    by_operation: HashMap<(Method, String), BTreeSet<String>>,
}

impl QueryParameters {
    pub fn from_document(openapi: &OpenApi) -> Self {
        let mut by_operation = HashMap::new();
        for (path, item) in openapi.paths.paths.iter() {
            let operations = [
                (Method::GET, &item.get),
                (Method::PUT, &item.put),
                (Method::POST, &item.post),
                (Method::DELETE, &item.delete),
                (Method::PATCH, &item.patch),
            ];
            for (method, operation) in operations {
                if let Some(operation) = operation {
                    by_operation.insert((method, path.clone()), query_names(operation));
                }
            }
        }
        Self { by_operation }
    }

    /// Also accept `names` on one operation: parameters its description documents but OpenAPI
    /// cannot state (the raw artifact upload's, which only that content type uses).
    pub fn allow(&mut self, method: Method, path: &str, names: &[&str]) {
        self.by_operation.entry((method, path.to_string())).or_default().extend(names.iter().map(|name| name.to_string()));
    }

    fn check(&self, method: &Method, path: &str, query: Option<&str>) -> Result<(), ApiError> {
        // Operations the document does not describe (none today) are not policed here.
        let Some(allowed) = self.by_operation.get(&(method.clone(), path.to_string())) else {
            return Ok(());
        };
        let Some(query) = query.filter(|query| !query.is_empty()) else {
            return Ok(());
        };
        let pairs: Vec<(String, String)> = query_pairs(query)?;
        if let Some((name, _)) = pairs.iter().find(|(name, _)| !allowed.contains(name)) {
            let known = if allowed.is_empty() { "none".to_string() } else { allowed.iter().cloned().collect::<Vec<_>>().join(", ") };
            return Err(ApiError::invalid_field(name, format!("unknown query parameter {name:?}; this endpoint takes: {known}")));
        }
        Ok(())
    }
}

fn query_names(operation: &Operation) -> BTreeSet<String> {
    operation
        .parameters
        .iter()
        .flatten()
        .filter_map(|parameter| match parameter {
            RefOr::T(parameter) if matches!(parameter.parameter_in, ParameterIn::Query) => Some(parameter.name.clone()),
            _ => None,
        })
        .collect()
}

/// The decoded name/value pairs of a query string.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    let uri: axum::http::Uri = format!("/?{query}").parse().map_err(|_| ApiError::bad_request("the query string is malformed"))?;
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|axum::extract::Query(pairs)| pairs)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

/// Middleware: 400 for a query parameter the matched operation does not take.
pub async fn reject_unknown(State(parameters): State<Arc<QueryParameters>>, request: Request, next: Next) -> Response {
    let path = request.extensions().get::<MatchedPath>().map(|matched| matched.as_str().to_string());
    if let Some(path) = path
        && let Err(error) = parameters.check(request.method(), &path, request.uri().query())
    {
        return error.into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_parameters_pass_and_others_are_named() {
        let parameters = QueryParameters::from_document(&super::super::openapi_document());
        parameters.check(&Method::GET, "/api/v1/repos", Some("limit=2&cursor=5")).unwrap();
        parameters.check(&Method::GET, "/api/v1/repos", None).unwrap();
        parameters.check(&Method::GET, "/api/v1/configs/{environment}", Some("stale_ok=true&pipeline_id=3")).unwrap();
        let error = parameters.check(&Method::GET, "/api/v1/repos", Some("limit=2&pipelineid=3")).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("pipelineid"));
        let error = parameters.check(&Method::GET, "/api/v1/repos/{id}", Some("x=1")).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("x"));
    }
}
