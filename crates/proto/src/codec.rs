//! The services' codec: prost, except that a message carrying fields this build does
//! not know is refused with INVALID_ARGUMENT instead of being silently trimmed (a
//! client setting a field we ignore would otherwise get an answer it did not ask for).
use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        StrictCodec(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(PhantomData)
    }
}

pub struct StrictDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use bytes::Buf;
        let len = buf.remaining();
        let msg = U::decode(buf).map_err(|e| Status::invalid_argument(format!("malformed message: {e}")))?;
        // prost skips unknown fields: a shorter re-encoding means some were there.
        if msg.encoded_len() < len {
            return Err(Status::invalid_argument(format!(
                "the message has {} bytes of fields this server does not know (a newer client, or a typo in a field number)",
                len - msg.encoded_len()
            )));
        }
        Ok(Some(msg))
    }
}
