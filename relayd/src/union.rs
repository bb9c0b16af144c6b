//! One view of all models: for a user with several devices connected,
//! `GET /api/tags`, `/api/ps` and `/v1/models` are asked of every device
//! and answered as the union: each model once, in the order first seen,
//! with the devices that list it in a `devices` field that clients ignore.

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::body::RelayBody;
use crate::edge;
use crate::response::{self, Shape};
use crate::session::Session;
use crate::state::{Conn, Shared};

/// The most of one device's listing read.
const MAX_LISTING: usize = 4 * 1024 * 1024;

/// How a listing names its models: the key of the list, and the field of
/// each entry that names the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listing {
    pub list: &'static str,
    pub name: &'static str,
}

/// The listing `method` and `path` ask for, when they ask for one.
pub fn listing(method: &Method, path: &str) -> Option<Listing> {
    if method != Method::GET {
        return None;
    }
    match path {
        "/api/tags" | "/api/ps" => Some(Listing { list: "models", name: "name" }),
        "/v1/models" => Some(Listing { list: "data", name: "id" }),
        _ => None,
    }
}

/// Asks every device in `sessions` for `req`'s listing at once and answers
/// the union of those that answered 200 with JSON; 502 when none did.
pub async fn answer(
    shared: &Shared,
    conn: &Conn,
    sessions: Vec<Arc<Session>>,
    req: edge::Request,
    listing: Listing,
) -> Response<RelayBody> {
    let asks = sessions.into_iter().map(|session| {
        // A GET of a list has no body to stream: it copies.
        let one = req.replay();
        let device = session.device.clone();
        async move {
            let resp = crate::forward::deliver(shared, conn, session, one?, None).await;
            if resp.status() != StatusCode::OK {
                return None;
            }
            let body = http_body_util::Limited::new(resp.into_body(), MAX_LISTING);
            let bytes = body.collect().await.ok()?.to_bytes();
            Some((device, serde_json::from_slice::<Value>(&bytes).ok()?))
        }
    });
    let answers: Vec<(String, Value)> =
        futures_util::future::join_all(asks).await.into_iter().flatten().collect();
    let Some(body) = merge(&answers, listing) else {
        let shape = Shape::of(req.path());
        let why = "none of this user's connected devices answered the model list";
        return response::error(shape, StatusCode::BAD_GATEWAY, "no_device_answered", why);
    };
    let mut resp = Response::new(RelayBody::full(body.to_string()));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The union of `answers` (device, its listing): the first answer with, as
/// its list, each model of every answer once (by name, in the order first
/// seen) and the devices that listed it under `devices`. `None` without an
/// answer that is a JSON object.
pub fn merge(answers: &[(String, Value)], listing: Listing) -> Option<Value> {
    let mut out = answers.iter().find(|(_, a)| a.is_object())?.1.clone();
    let mut models: Vec<Value> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (device, answer) in answers {
        let entries = answer.get(listing.list).and_then(Value::as_array);
        for entry in entries.into_iter().flatten() {
            let Some(name) = entry.get(listing.name).and_then(Value::as_str) else { continue };
            match seen.get(name) {
                Some(&i) => {
                    if let Some(Value::Array(devices)) = models[i].get_mut("devices") {
                        devices.push(device.as_str().into());
                    }
                }
                None => {
                    let mut entry = entry.clone();
                    if let Some(fields) = entry.as_object_mut() {
                        fields.insert("devices".into(), Value::Array(vec![device.as_str().into()]));
                    }
                    seen.insert(name.to_owned(), models.len());
                    models.push(entry);
                }
            }
        }
    }
    out[listing.list] = Value::Array(models);
    Some(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn each_model_once_with_the_devices_that_list_it() {
        let tags = listing(&Method::GET, "/api/tags").expect("a listing");
        let answers = vec![
            (
                "gpu-box".to_owned(),
                json!({ "models": [{ "name": "a", "size": 1 }, { "name": "b" }] }),
            ),
            (
                "laptop".to_owned(),
                json!({ "models": [{ "name": "b", "size": 2 }, { "name": "c" }] }),
            ),
            ("broken".to_owned(), json!({ "models": "none" })),
        ];
        let union = merge(&answers, tags).expect("a union");
        assert_eq!(
            union,
            json!({ "models": [
                { "name": "a", "size": 1, "devices": ["gpu-box"] },
                { "name": "b", "devices": ["gpu-box", "laptop"] },
                { "name": "c", "devices": ["laptop"] },
            ] })
        );
        let models = listing(&Method::GET, "/v1/models").expect("a listing");
        let answers = vec![
            ("x".to_owned(), json!({ "object": "list", "data": [{ "id": "m" }] })),
            ("y".to_owned(), json!({ "object": "list", "data": [{ "id": "m" }] })),
        ];
        assert_eq!(
            merge(&answers, models).expect("a union"),
            json!({ "object": "list", "data": [{ "id": "m", "devices": ["x", "y"] }] })
        );
        assert_eq!(merge(&[], tags), None);
        assert_eq!(listing(&Method::POST, "/api/tags"), None);
        assert_eq!(listing(&Method::GET, "/api/chat"), None);
    }
}
