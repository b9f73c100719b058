/*
 * ops.c: health and readiness for load balancers and orchestrators.
 */
#include "api/api_int.h"

void api_ops_healthz(tly_req_t *req, const tly_params_t *params, void *arg)
{
    api_respond_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

void api_ops_readyz(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    if (tly_store_writable(app->store)) {
        api_respond_json(req, 200, json_pack("{s:s}", "status", "ok"));
        return;
    }
    tly_req_add_header(req, "Retry-After", "5");
    api_respond_error(req, 503, "NOT_READY", "the store does not accept writes", NULL);
}
