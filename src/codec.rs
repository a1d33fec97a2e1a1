//! The gRPC codec every generated client and server uses: prost encoding with
//! small initial buffers. tonic's default gives every stream 8 KiB encode and
//! decode buffers, which at tens of thousands of agent streams is the largest
//! avoidable memory cost (34.8 KiB per connection against 26.7 KiB for a bare
//! tonic server, BENCHMARKS.md "Fleet scale").
//! Agent messages are tens of bytes; buffers still grow for larger messages.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstCodec;

/// Initial size of a stream's encode and decode buffer.
pub const BUFFER_SIZE: usize = 512;
/// tonic's default yield threshold (32 KiB).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER_SIZE`] buffers.
#[derive(Debug, Clone)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = PeerDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        PeerDecoder(ProstCodec::<T, U>::raw_decoder(BufferSettings::new(
            BUFFER_SIZE,
            YIELD_THRESHOLD,
        )))
    }
}

/// prost's decoder, with a message that does not decode (invalid UTF-8 in a string
/// field, a bad varint) reported as the peer's fault, INVALID_ARGUMENT, where
/// tonic says INTERNAL.
#[derive(Debug)]
pub struct PeerDecoder<D>(D);

impl<D: Decoder<Error = Status>> Decoder for PeerDecoder<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(src).map_err(|status| match status.code() {
            Code::Internal => Status::invalid_argument(format!("undecodable message: {}", status.message())),
            _ => status,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
