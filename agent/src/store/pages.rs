//! Manifest pages in the store: each page is a blob, so peers and the origin serve them like
//! any other; decoded pages are kept in a bounded cache, since every lookup walks from the
//! root.

use std::num::NonZeroUsize;

use voltool_protocol::tree::{Page, PageRef, PageSource, TreeError};

use super::*;

/// Decoded pages kept in memory (about 25 KiB encoded each on average).
const CACHED_PAGES: usize = 1024;

/// The store's manifest pages, decoded on demand.
#[derive(Debug, Clone)]
pub struct Pages {
    store: Store,
    cache: Arc<std::sync::Mutex<lru::LruCache<Hash, Arc<Page>>>>,
}

impl Pages {
    /// Pages of `store`.
    pub fn new(store: Store) -> Self {
        let cap = NonZeroUsize::new(CACHED_PAGES).expect("non-zero");
        Pages {
            store,
            cache: Arc::new(std::sync::Mutex::new(lru::LruCache::new(cap))),
        }
    }

    /// Adds new pages to `batch` (durable once it is finished), but those already held.
    pub fn put(&self, batch: &ImportBatch, pages: &[(PageRef, Vec<u8>)]) -> Result<(), StoreError> {
        let mut sink = self.sink(batch);
        for (r, bytes) in pages {
            sink.add(*r, bytes);
        }
        sink.done()
    }

    /// A sink for the pages a tree operation writes: each goes into `batch` as it comes
    /// (but those already held), so they are never all in memory at once.
    pub fn sink<'a>(&'a self, batch: &'a ImportBatch) -> PageSink<'a> {
        PageSink {
            pages: self,
            batch,
            seen: std::collections::HashSet::new(),
            error: None,
        }
    }

    /// Adds new pages and makes them durable.
    pub fn put_now(&self, pages: &[(PageRef, Vec<u8>)]) -> Result<(), StoreError> {
        let batch = self.store.batch();
        self.put(&batch, pages)?;
        batch.finish().map(|_| ())
    }
}

impl PageSource for Pages {
    fn page(&self, r: &PageRef) -> Result<Option<Arc<Page>>, TreeError> {
        if let Some(p) = self.cache.lock().expect("not poisoned").get(&r.hash) {
            return Ok(Some(p.clone()));
        }
        let bytes = match self.store.read_all(&r.hash) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(TreeError::Source(e.to_string())),
        };
        let page = Page::decode(&bytes).map_err(|e| TreeError::Bad {
            page: r.hash.short(),
            reason: e.to_string(),
        })?;
        let page = Arc::new(page);
        self.cache
            .lock()
            .expect("not poisoned")
            .put(r.hash, page.clone());
        Ok(Some(page))
    }
}

/// Pages on their way into an import batch (see [`Pages::sink`]).
#[derive(Debug)]
pub struct PageSink<'a> {
    pages: &'a Pages,
    batch: &'a ImportBatch,
    seen: std::collections::HashSet<Hash>,
    error: Option<StoreError>,
}

impl PageSink<'_> {
    /// Takes one page.
    pub fn add(&mut self, r: PageRef, bytes: &[u8]) {
        if self.error.is_some() || !self.seen.insert(r.hash) {
            return;
        }
        let r = match self.pages.store.has_complete(&r.hash) {
            Ok(true) => Ok(()),
            Ok(false) => self.batch.import_bytes(bytes).map(|_| ()),
            Err(e) => Err(e),
        };
        self.error = r.err();
    }

    /// The first failure, if any (the batch then must not be finished).
    pub fn done(self) -> Result<(), StoreError> {
        self.error.map_or(Ok(()), Err)
    }
}
