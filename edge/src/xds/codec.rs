//! A gRPC codec that decodes requests with prost and writes responses from
//! pre-encoded bytes, so a response shared by many streams is never
//! re-encoded.

use std::marker::PhantomData;

use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Status,
};

use super::response::Outbound;

/// Initial size of each stream's encode and decode buffers. tonic's default
/// (8 KiB each) is most of an idle stream's memory; xDS requests are small,
/// and both buffers grow for a large message.
const BUFFER: usize = 1024;
/// Encoded bytes after which an encoder yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Requests of type `R` in, [`Outbound`] bodies out.
#[derive(Debug)]
pub(crate) struct AdsCodec<R>(PhantomData<fn() -> R>);

impl<R> Default for AdsCodec<R> {
    fn default() -> Self {
        AdsCodec(PhantomData)
    }
}

impl<R: prost::Message + Default + Send + 'static> Codec for AdsCodec<R> {
    type Encode = Outbound;
    type Decode = R;
    type Encoder = OutboundEncoder;
    type Decoder = RequestDecoder<R>;

    fn encoder(&mut self) -> Self::Encoder {
        OutboundEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub(crate) struct OutboundEncoder;

impl Encoder for OutboundEncoder {
    type Item = Outbound;
    type Error = Status;

    fn encode(&mut self, item: Outbound, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write(dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER, YIELD_THRESHOLD)
    }
}

#[derive(Debug)]
pub(crate) struct RequestDecoder<R>(PhantomData<fn() -> R>);

impl<R: prost::Message + Default> Decoder for RequestDecoder<R> {
    type Item = R;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        R::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("undecodable request: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER, YIELD_THRESHOLD)
    }
}
