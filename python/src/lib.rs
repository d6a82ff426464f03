//! `voltool._native`: the agent's control socket for the `voltool` Python package.
//!
//! The Python side builds requests as JSON values of [`control::Request`] (serde's external
//! tagging: `{"VolumeLs": {...}}`) and gets the answer's value back as JSON; this module only
//! moves frames over the Unix socket, with the GIL released while it waits, and raises the
//! exception of `voltool.exception` that matches the agent's [`ErrorCode`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use voltool_protocol::control::{
    self, ControlError, ErrorCode, ErrorReply, Event, Request, UploadChunk,
};
use voltool_protocol::frame;

/// A failure of a request.
#[derive(Debug, thiserror::Error)]
enum NativeError {
    /// The request is not a valid request.
    #[error("not a valid request: {0}")]
    Request(serde_json::Error),
    /// The answer cannot be written as JSON.
    #[error("cannot encode the agent's answer: {0}")]
    Reply(serde_json::Error),
    /// The connection to the agent failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The agent refused or failed the request.
    #[error("{}", .0.message)]
    Refused(ErrorReply),
}

impl NativeError {
    /// The `voltool.exception` class this failure raises.
    fn class(&self) -> &'static str {
        match self {
            NativeError::Request(_) => "InvalidError",
            NativeError::Control(ControlError::Connect { .. }) => "AgentUnavailableError",
            NativeError::Control(_) | NativeError::Reply(_) => "Error",
            NativeError::Refused(e) => match e.code {
                ErrorCode::NotFound => "NotFoundError",
                ErrorCode::NotMounted => "NotMountedError",
                ErrorCode::Exists => "AlreadyExistsError",
                ErrorCode::Invalid => "InvalidError",
                ErrorCode::Dirty => "ConflictError",
                ErrorCode::Verify => "VerificationError",
                ErrorCode::HeadRefused => "HeadRefusedError",
                ErrorCode::Forbidden => "ForbiddenError",
                _ => "Error",
            },
        }
    }

    fn into_py(self, py: Python<'_>) -> PyErr {
        let raise = || -> PyResult<PyErr> {
            let class = py.import("voltool.exception")?.getattr(self.class())?;
            Ok(PyErr::from_value(class.call1((self.to_string(),))?))
        };
        raise().unwrap_or_else(|e| e)
    }
}

/// One request on a fresh connection: the stream, positioned at the first answer frame.
struct Conn(UnixStream);

impl Conn {
    fn open(agent: &str, request: &str) -> Result<Self, NativeError> {
        let req: Request = serde_json::from_str(request).map_err(NativeError::Request)?;
        let [admin, path] = control::sockets(Path::new(agent));
        let mut s = match UnixStream::connect(&admin) {
            Ok(s) => s,
            Err(e) if control::try_next(&e) => {
                UnixStream::connect(&path).map_err(|source| ControlError::Connect {
                    path: path.display().to_string(),
                    source,
                })?
            }
            Err(source) => {
                return Err(ControlError::Connect {
                    path: admin.display().to_string(),
                    source,
                }
                .into());
            }
        };
        s.write_all(&frame::encode(&req))
            .map_err(ControlError::Io)?;
        Ok(Conn(s))
    }

    /// The next event; the connection's end before [`Event::Done`] is an error.
    fn next(&mut self) -> Result<Event, NativeError> {
        let mut prefix = [0u8; frame::PREFIX_LEN];
        match self.0.read_exact(&mut prefix) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ControlError::NoAnswer.into());
            }
            Err(e) => return Err(ControlError::Io(e).into()),
        }
        let len = frame::body_len(prefix, control::MAX_FRAME).map_err(ControlError::Frame)?;
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).map_err(ControlError::Io)?;
        Ok(frame::decode(&body).map_err(ControlError::Frame)?)
    }

    /// Reads to the final answer, skipping progress and joining a listing sent in parts;
    /// returns its value as JSON.
    fn finish(mut self) -> Result<String, NativeError> {
        let mut listed = Vec::new();
        loop {
            match self.next()? {
                Event::Done(r) => {
                    let reply = control::join_listing(listed, *r).map_err(NativeError::Refused)?;
                    return serde_json::to_string(&reply).map_err(NativeError::Reply);
                }
                Event::Entries(part) => listed.extend(part),
                _ => {}
            }
        }
    }
}

/// Sends one request (JSON) to the agent whose run directory (that of its sockets) is `agent`; returns the
/// answer (JSON) or raises the matching `voltool.exception` class.
#[pyfunction]
fn call(py: Python<'_>, agent: String, request: String) -> PyResult<String> {
    py.detach(|| Conn::open(&agent, &request)?.finish())
        .map_err(|e| e.into_py(py))
}

/// The bytes of a streamed answer, as they arrive.
#[pyclass(module = "voltool._native")]
struct ByteStream {
    conn: Option<Conn>,
}

#[pymethods]
impl ByteStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Py<PyBytes>> {
        let Some(mut conn) = self.conn.take() else {
            return Err(PyStopIteration::new_err(()));
        };
        let got: Result<(Option<Vec<u8>>, Option<Conn>), NativeError> = py.detach(|| {
            loop {
                match conn.next()? {
                    Event::Data(bytes) => return Ok((Some(bytes), Some(conn))),
                    Event::Done(r) => {
                        (*r).map_err(NativeError::Refused)?;
                        return Ok((None, None));
                    }
                    _ => {}
                }
            }
        });
        match got {
            Ok((Some(bytes), conn)) => {
                self.conn = conn;
                Ok(PyBytes::new(py, &bytes).unbind())
            }
            Ok((None, _)) => Err(PyStopIteration::new_err(())),
            Err(e) => Err(e.into_py(py)),
        }
    }
}

/// Sends a request whose answer is a byte stream; the iterator yields the bytes and raises
/// the matching `voltool.exception` class if the agent fails the request.
#[pyfunction]
fn read(py: Python<'_>, agent: String, request: String) -> PyResult<ByteStream> {
    Ok(ByteStream {
        conn: Some(open(py, &agent, &request)?),
    })
}

/// Sends a request on a fresh connection, the GIL released while it connects.
fn open(py: Python<'_>, agent: &str, request: &str) -> PyResult<Conn> {
    py.detach(|| Conn::open(agent, request))
        .map_err(|e| e.into_py(py))
}

/// An upload in progress (`VolumeUpload`): the request is sent; each file's bytes follow,
/// in the order of the request's file entries, as [`UploadChunk`] frames, an empty one
/// ending each file; then the answer.
#[pyclass(module = "voltool._native")]
struct Uploader {
    conn: Option<Conn>,
}

impl Uploader {
    fn conn(&mut self) -> PyResult<&mut Conn> {
        self.conn
            .as_mut()
            .ok_or_else(|| pyo3::exceptions::PyValueError::new_err("the upload is over"))
    }
}

#[pymethods]
impl Uploader {
    /// Sends one chunk of the current file (at most `UPLOAD_CHUNK` bytes; empty ends the
    /// file). False if the agent has closed the connection: `finish` then says why.
    fn send(&mut self, py: Python<'_>, chunk: &[u8]) -> PyResult<bool> {
        if chunk.len() > control::UPLOAD_CHUNK {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "a chunk holds at most {} bytes",
                control::UPLOAD_CHUNK
            )));
        }
        let conn = self.conn()?;
        let frame = frame::encode(&UploadChunk(chunk.to_vec()));
        match py.detach(|| conn.0.write_all(&frame)) {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(NativeError::from(ControlError::Io(e)).into_py(py)),
        }
    }

    /// Ends the upload early (a local file could not be read): the agent sees the stream
    /// end inside a file and commits nothing.
    fn abort(&mut self, py: Python<'_>) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.0.shutdown(std::net::Shutdown::Write);
            let _ = py.detach(|| conn.finish());
        }
    }

    /// The agent's answer (JSON), or the matching `voltool.exception` class raised.
    fn finish(&mut self, py: Python<'_>) -> PyResult<String> {
        let conn = self
            .conn
            .take()
            .ok_or_else(|| pyo3::exceptions::PyValueError::new_err("the upload is over"))?;
        py.detach(|| conn.finish()).map_err(|e| e.into_py(py))
    }
}

/// Starts an upload (a `VolumeUpload` request, JSON): the files' bytes follow through the
/// returned [`Uploader`]. The bytes are read by the caller, never by the agent.
#[pyfunction]
fn upload(py: Python<'_>, agent: String, request: String) -> PyResult<Uploader> {
    Ok(Uploader {
        conn: Some(open(py, &agent, &request)?),
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(call, m)?)?;
    m.add_function(wrap_pyfunction!(read, m)?)?;
    m.add_function(wrap_pyfunction!(upload, m)?)?;
    m.add_class::<ByteStream>()?;
    m.add_class::<Uploader>()?;
    m.add("UPLOAD_CHUNK", control::UPLOAD_CHUNK)?;
    Ok(())
}
