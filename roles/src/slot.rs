//! A tiny shared slot holding the current address of a restartable actor.
use std::sync::{Arc, RwLock};
pub struct Slot<T>(Arc<RwLock<Option<T>>>);
impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}
impl<T: Clone> Default for Slot<T> {
    fn default() -> Self {
        Self(Arc::new(RwLock::new(None)))
    }
}
impl<T: Clone> Slot<T> {
    pub fn set(&self, v: Option<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = v;
    }
    pub fn get(&self) -> Option<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
