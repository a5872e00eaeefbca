//! The gate every request passes before a handler: the Host allow-list (DNS rebinding), the
//! cross-origin check for state-changing requests (a page on another site cannot post uploads or
//! deletes here), the API key (`Authorization: Bearer`) and the rule table of [`crate::access`],
//! then the audit line for every change and refusal. Also the security headers of every response
//! and [`Caller`], the extractor handlers use for checks that depend on the body or a job.
//!
//! Rules live in `access`; this file only applies them to HTTP.

use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode, header};
use actix_web::middleware::{DefaultHeaders, Next};
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};

use super::{ApiError, AppState};
use crate::access::audit::AuditEvent;
use crate::access::{self, AccessError, Need, Principal};

/// The UI is same-origin only: scripts, styles and requests from this server, never framed.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// Security headers on every response (a handler's own value wins, e.g. a report's CSP).
pub fn headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add((header::CONTENT_SECURITY_POLICY, CSP))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::REFERRER_POLICY, "no-referrer"))
}

/// What the gate knows besides the app state: which Host headers are this server.
#[derive(Debug, Clone)]
pub struct Gate {
    hosts: Vec<String>,
    any_host: bool,
}

impl Gate {
    /// Loopback names, the bound address and `server.allowed_hosts`.
    pub fn new(allowed: &[String], bound: &[SocketAddr]) -> Gate {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .map(String::from)
            .chain(
                allowed
                    .iter()
                    .map(|h| h.trim_matches(['[', ']']).to_lowercase()),
            )
            .collect();
        for addr in bound {
            if !addr.ip().is_unspecified() {
                hosts.push(addr.ip().to_string());
            }
        }
        Gate {
            any_host: allowed.iter().any(|h| h == "*"),
            hosts,
        }
    }

    fn check_host(&self, req: &ServiceRequest) -> Result<(), ApiError> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| {
                refused(
                    StatusCode::BAD_REQUEST,
                    "invalid_host",
                    "missing Host header",
                )
            })?;
        if self.any_host || self.hosts.iter().any(|h| *h == host_name(host)) {
            return Ok(());
        }
        Err(refused(
            StatusCode::BAD_REQUEST,
            "invalid_host",
            format!(
                "Host {host:?} is not this server's name: add it to server.allowed_hosts \
                 (protects against DNS rebinding)"
            ),
        ))
    }
}

/// The host part of a Host or Origin authority, lowercased, without port or IPv6 brackets.
fn host_name(authority: &str) -> String {
    let authority = authority.to_lowercase();
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    authority.split(':').next().unwrap_or_default().to_string()
}

/// State-changing requests must come from this origin: browsers say where a request comes from
/// (`Sec-Fetch-Site`, or `Origin`), and a form or fetch from another site is refused.
fn check_origin(req: &ServiceRequest) -> Result<(), ApiError> {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let header_str = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let cross = |why: String| Err(refused(StatusCode::FORBIDDEN, "cross_origin", why));
    if let Some(site) = header_str("sec-fetch-site") {
        return match site {
            "same-origin" | "none" => Ok(()),
            other => cross(format!(
                "cross-site request refused (Sec-Fetch-Site: {other})"
            )),
        };
    }
    if let Some(origin) = header_str(header::ORIGIN.as_str()) {
        let host = header_str(header::HOST.as_str()).unwrap_or_default();
        let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or(origin);
        if !authority.eq_ignore_ascii_case(host) {
            return cross(format!(
                "request from origin {origin:?} refused: not this server"
            ));
        }
    }
    Ok(())
}

fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(status, code, message)
}

/// The bearer token of a request, if any.
fn bearer(req: &ServiceRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

async fn authenticate(state: &AppState, req: &ServiceRequest) -> Result<Principal, ApiError> {
    if !state.app.settings.server.auth {
        return Ok(Principal::local());
    }
    let Some(token) = bearer(req) else {
        return Err(unauthenticated(
            "this route needs an API key: send `Authorization: Bearer <key>` \
             (an admin makes keys with `domainrag keys create`)",
        ));
    };
    let keys = Arc::clone(&state.keys);
    let principal = web::block(move || keys.authenticate(&token))
        .await
        .map_err(|e| ApiError::from_kind(crate::error::ErrorKind::Internal, &e))?;
    principal.map_err(|e| match e {
        AccessError::Unauthenticated(m) => unauthenticated(m),
        other => other.into(),
    })
}

fn unauthenticated(message: impl Into<String>) -> ApiError {
    refused(StatusCode::UNAUTHORIZED, "unauthenticated", message)
}

/// The middleware: host, origin, key, rule, audit.
pub async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .expect("the app registers its state");
    let gate = req
        .app_data::<web::Data<Gate>>()
        .cloned()
        .expect("the app registers its gate");
    if let Err(e) = gate.check_host(&req).and_then(|()| check_origin(&req)) {
        return Ok(req.error_response(e));
    }
    let pattern = req.match_pattern();
    let need = access::route_need(req.method().as_str(), pattern.as_deref());
    if need == Need::Public {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    let action = format!("{} {}", req.method(), req.path());
    let principal = match authenticate(&state, &req).await {
        Ok(p) => p,
        Err(e) => {
            if bearer(&req).is_some() {
                audit(&state, None, &action, e.status);
            }
            let mut res = req.error_response(e);
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return Ok(res);
        }
    };
    if let Need::Action(needed) = need {
        let collection = pattern
            .as_deref()
            .and_then(|p| access::path_collection(p, req.path()));
        if let Err(e) = principal.require(needed, collection) {
            let e = ApiError::from(e);
            audit(&state, Some(&principal), &action, e.status);
            return Ok(req.error_response(e));
        }
    }
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    req.extensions_mut().insert(principal.clone());
    let res = next.call(req).await?;
    if changes || res.status() == StatusCode::FORBIDDEN {
        audit(&state, Some(&principal), &action, res.status());
    }
    Ok(res.map_into_boxed_body())
}

fn audit(state: &AppState, who: Option<&Principal>, action: &str, status: StatusCode) {
    let role = who.map(|p| p.role.to_string()).unwrap_or_default();
    state.audit.record(&AuditEvent {
        time: crate::collection::now_secs(),
        key_id: who.map_or("-", |p| p.key_id.as_str()),
        key_name: who.map_or("-", |p| p.name.as_str()),
        role: &role,
        action,
        status: status.as_u16(),
    });
}

/// The caller of a request (set by [`gate`]); a handler asks it about the collection in a body or
/// a job. Missing means the gate did not run: refused, never assumed.
pub struct Caller(pub Principal);

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<Principal>()
                .cloned()
                .map(Caller)
                .ok_or_else(|| unauthenticated("no API key checked for this request")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_lose_port_and_brackets() {
        assert_eq!(host_name("LocalHost:8080"), "localhost");
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("10.0.0.5"), "10.0.0.5");
    }

    #[test]
    fn the_gate_knows_loopback_the_bound_address_and_configured_names() {
        let gate = Gate::new(
            &["rag.example.internal".into()],
            &[
                "10.1.2.3:8080".parse().unwrap(),
                "0.0.0.0:8080".parse().unwrap(),
            ],
        );
        for h in [
            "localhost",
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "rag.example.internal",
        ] {
            assert!(gate.hosts.contains(&h.to_string()), "{h}");
        }
        assert!(!gate.hosts.contains(&"0.0.0.0".to_string()));
        assert!(!gate.any_host);
    }
}
