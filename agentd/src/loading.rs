//! Models requests are loading. A request to an endpoint that loads a model
//! ([`daemon::model::loads_a_model`]) whose body names one that the last
//! check did not find in memory is loading it until the local service
//! answers (Ollama sends the head once the model is in memory: seconds to
//! minutes for a large one). The agent tells the relay at once
//! ([`Loading::changed`]), so that other requests for the model wait for
//! this load rather than load it on another device, and `tunnelctl status`
//! shows it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tunnel_proto::message::MAX_SERVICE_MODELS;

#[derive(Debug, Default)]
pub struct Loading {
    inner: Mutex<State>,
    /// Woken when the models loading change: a report goes out.
    pub changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    /// In memory, as the last check found them, plus those requests
    /// loaded since.
    loaded: Vec<String>,
    /// Loading, with the requests that wait for each.
    loading: Vec<(String, u32)>,
}

impl Loading {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the last check found in memory.
    pub fn set_loaded(&self, models: &[String]) {
        models.clone_into(&mut self.lock().loaded);
    }

    /// The models loading now.
    pub fn models(&self) -> Vec<String> {
        self.lock().loading.iter().map(|(m, _)| m.clone()).collect()
    }

    /// A request for `model` went to the service: loading it unless it is
    /// in memory. `None` when it is, or too many models load at once.
    pub fn start(self: &Arc<Self>, model: &str) -> Option<LoadGuard> {
        let mut state = self.lock();
        if state.loaded.iter().any(|m| daemon::model::same_model(m, model)) {
            return None;
        }
        match state.loading.iter().position(|(m, _)| m == model) {
            Some(i) => state.loading[i].1 += 1,
            None if state.loading.len() < MAX_SERVICE_MODELS => {
                state.loading.push((model.to_owned(), 1));
                drop(state);
                self.changed.notify_one();
            }
            None => return None,
        }
        Some(LoadGuard { loading: self.clone(), model: model.to_owned() })
    }
}

/// A request loading a model; dropped, it no longer waits for the load.
#[derive(Debug)]
pub struct LoadGuard {
    loading: Arc<Loading>,
    model: String,
}

impl LoadGuard {
    /// The service answered with success: the model is in memory.
    pub fn loaded(self) {
        let mut state = self.loading.lock();
        if !state.loaded.contains(&self.model) && state.loaded.len() < MAX_SERVICE_MODELS {
            state.loaded.push(self.model.clone());
        }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        let mut state = self.loading.lock();
        let Some(i) = state.loading.iter().position(|(m, _)| *m == self.model) else { return };
        state.loading[i].1 -= 1;
        if state.loading[i].1 == 0 {
            state.loading.swap_remove(i);
            drop(state);
            self.loading.changed.notify_one();
        }
    }
}

/// The model a request's first body chunk names, when it holds the whole
/// JSON object (a chat's body nearly always fits one).
pub fn model_in(first_chunk: &[u8]) -> Option<String> {
    daemon::model::named_models(first_chunk).ok()?.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_not_in_memory_loads_until_its_last_request_is_answered() {
        let loading = Arc::new(Loading::default());
        loading.set_loaded(&["qwen2.5:7b".into()]);
        assert!(loading.start("qwen2.5:7b").is_none(), "in memory: nothing to load");
        let first = loading.start("llama3.2").expect("a load");
        let second = loading.start("llama3.2").expect("the same load");
        assert_eq!(loading.models(), ["llama3.2"]);
        drop(first);
        assert_eq!(loading.models(), ["llama3.2"]);
        second.loaded();
        assert!(loading.models().is_empty());
        assert!(loading.start("llama3.2:latest").is_none(), "loaded now");
        loading.set_loaded(&[]);
        assert!(loading.start("llama3.2").is_some(), "the next check found it unloaded");
    }

    #[test]
    fn a_first_chunk_names_its_model_when_it_holds_the_whole_body() {
        assert_eq!(model_in(br#"{"model":"llama3.2","messages":[]}"#).as_deref(), Some("llama3.2"));
        assert_eq!(model_in(br#"{"model":"llama3."#), None, "cut short");
    }
}
