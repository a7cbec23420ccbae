//! What the policy benches share: a request's header fields as the server would hand them over.

use bytes::Bytes;
use portcullis_policy::HeaderList;

pub(crate) struct Fields(pub(crate) Vec<(Bytes, Bytes)>);

impl HeaderList for Fields {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn name(&self, i: usize) -> &[u8] {
        &self.0[i].0
    }
    fn value(&self, i: usize) -> &[u8] {
        &self.0[i].1
    }
}
