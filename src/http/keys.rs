//! Key routes (inside `/api`, admin keys only by the rule table in `access`): list keys, create one
//! (the response carries its token, the only time it is shown), revoke one.

use actix_web::{HttpResponse, web};

use super::{ApiError, AppState};
use crate::access::keys::KeySpec;

type State = web::Data<AppState>;

async fn list_keys(state: State) -> Result<HttpResponse, ApiError> {
    let keys = std::sync::Arc::clone(&state.keys);
    let list = web::block(move || keys.list()).await.map_err(internal)??;
    Ok(HttpResponse::Ok().json(list))
}

async fn create_key(state: State, body: web::Json<KeySpec>) -> Result<HttpResponse, ApiError> {
    let keys = std::sync::Arc::clone(&state.keys);
    let spec = body.into_inner();
    let new = web::block(move || keys.create(spec))
        .await
        .map_err(internal)??;
    Ok(HttpResponse::Created().json(new))
}

async fn revoke_key(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let keys = std::sync::Arc::clone(&state.keys);
    let view = web::block(move || keys.revoke(&id))
        .await
        .map_err(internal)??;
    Ok(HttpResponse::Ok().json(view))
}

fn internal(e: actix_web::error::BlockingError) -> ApiError {
    ApiError::from_kind(crate::error::ErrorKind::Internal, &e)
}

/// Key routes (inside `/api`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/keys", web::get().to(list_keys))
        .route("/keys", web::post().to(create_key))
        .route("/keys/{id}", web::delete().to(revoke_key));
}
