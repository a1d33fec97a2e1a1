//! `PredictionService`: the latest prediction and a stream of them.

use secbeat::pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{convert, watch};
use crate::{
    edge::auth::{Authority, Need},
    error::NoPrediction,
    runtime::role::Role,
};

/// The `PredictionService` implementation.
#[derive(Debug, Clone)]
pub struct PredictionApi {
    role: Role,
    authority: Authority,
}

impl PredictionApi {
    /// A service answering from the leader term's scaling loop (a standby refuses
    /// with the leader's URL) to callers `authority` admits.
    pub fn new(role: Role, authority: Authority) -> Self {
        Self { role, authority }
    }

    fn allow<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let caller = super::caller(&self.authority, request);
        self.authority.allow(&caller, Need::Read).map_err(Status::from)
    }
}

#[tonic::async_trait]
impl pb::prediction_service_server::PredictionService for PredictionApi {
    type WatchPredictionsStream = ReceiverStream<Result<pb::Prediction, Status>>;

    async fn get_prediction(
        &self,
        request: Request<pb::GetPredictionRequest>,
    ) -> Result<Response<pb::GetPredictionResponse>, Status> {
        self.allow(&request)?;
        let latest = self.role.leading()?.predictions.latest().ok_or(NoPrediction)?;
        Ok(Response::new(pb::GetPredictionResponse {
            prediction: Some(convert::prediction(&latest)),
        }))
    }

    async fn watch_predictions(
        &self,
        request: Request<pb::WatchPredictionsRequest>,
    ) -> Result<Response<Self::WatchPredictionsStream>, Status> {
        self.allow(&request)?;
        let (latest, updates) = self.role.leading()?.predictions.subscribe();
        let sent_up_to = latest.as_ref().map(|p| p.at);
        let first = latest.as_deref().map(convert::prediction).into_iter().collect();
        // The receiver was subscribed before `latest` was read: skip what `first`
        // already covered.
        let stream = watch::forward(updates, first, "predictions", move |prediction| {
            let newer = sent_up_to.is_none_or(|sent| prediction.at > sent);
            newer.then(|| convert::prediction(prediction))
        });
        Ok(Response::new(stream))
    }
}
