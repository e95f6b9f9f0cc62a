-- Argo CD health of a ttsfleet.io TtsDeployment, from its kstatus conditions.
-- Put it in argocd-cm under resource.customizations.health.ttsfleet.io_TtsDeployment
-- (see argocd.md). Plain Lua 5.1, as Argo CD's interpreter runs it.
--
--   no status, or status older than the spec  -> Progressing
--   Stalled=True                              -> Degraded (the spec must change)
--   CapacityExhausted=True                    -> Degraded (replicas with no node)
--   Ready=True                                -> Healthy
--   Reconciling=True                          -> Progressing
--   anything else                             -> Progressing "Waiting for status"
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function message_of(c, default)
  if c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return default
end

local status = obj.status
local generation = (obj.metadata ~= nil and obj.metadata.generation) or 0
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report a status"
  return hs
end
if status.observedGeneration == nil or status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local stalled = condition(status, "Stalled")
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = message_of(stalled, "Stalled")
  return hs
end
local exhausted = condition(status, "CapacityExhausted")
if is_true(exhausted) then
  hs.status = "Degraded"
  hs.message = message_of(exhausted, "Capacity exhausted")
  return hs
end
local ready = condition(status, "Ready")
if is_true(ready) then
  hs.status = "Healthy"
  hs.message = message_of(ready, "Ready")
  return hs
end
local reconciling = condition(status, "Reconciling")
if is_true(reconciling) then
  hs.status = "Progressing"
  hs.message = message_of(reconciling, "Reconciling")
  return hs
end

hs.status = "Progressing"
hs.message = "Waiting for status"
return hs
