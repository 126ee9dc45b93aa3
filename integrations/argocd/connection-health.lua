-- Argo CD health check for crmconnect.io/Connection (Lua 5.1 as Argo CD runs it; also 5.4).
-- Install: argocd-cm, key resource.customizations.health.crmconnect.io_Connection (see the README).
--   Healthy      Active, and its retriever pod is Ready
--   Progressing  not yet validated, a spec change not yet observed, or Active with the retriever
--                starting
--   Suspended    paused by its spec
--   Degraded     Inactive (tokens revoked or expired, bad configuration) or Conflict (the org
--                belongs to another connection): someone must act; the message says what
local hs = { status = "Progressing", message = "Waiting for the operator to validate the connection" }
if obj.status == nil or obj.status.state == nil then
  return hs
end
local st = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and st.observedGeneration ~= nil and st.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe the latest spec"
  return hs
end
local function condition(type)
  if st.conditions == nil then
    return nil
  end
  for _, c in ipairs(st.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end
local message = st.message or ""
if st.reason ~= nil and st.reason ~= "" then
  message = st.reason .. ": " .. message
end
if st.state == "Active" then
  local retriever = condition("RetrieverReady")
  if retriever ~= nil and retriever.status == "True" then
    hs.status = "Healthy"
  else
    hs.status = "Progressing"
    if retriever ~= nil and retriever.message ~= nil then
      message = retriever.message
    end
  end
elseif st.state == "Paused" then
  hs.status = "Suspended"
elseif st.state == "Inactive" or st.state == "Conflict" then
  hs.status = "Degraded"
end
hs.message = message
return hs
